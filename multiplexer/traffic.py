"""Per-instance traffic, counted in memory on the hot path; multiplexer/rollup.py writes it
out every 10 seconds.

Every call adds to its instance's current window (calls, errors, tokens, a latency
histogram): a dict lookup, a few increments and one bisect, on the event loop only. The
roll-up asks the loop for the windows (`take`: the loop swaps in empty ones and hands the
old ones over, with each gate's longest queue), so no count is lost to a race and nothing
is written per call.

Tokens are the `compute_tokens` an instance reports in each response's Metadata, read by
a wire scan that stops at that field (the multiplexer forwards responses unparsed).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multiplexer.wire import WireError, read_varint, skip_field
from telemetry import histogram

if TYPE_CHECKING:
    from multiplexer.routing import Router


class Window:
    """One instance's calls since the last roll-up."""

    __slots__ = ("calls", "errors", "latency", "tokens")

    def __init__(self) -> None:
        self.calls = self.errors = self.tokens = 0
        self.latency = [0] * histogram.SIZE


class Traffic:
    """The current windows; `record` and `take` run on the server's event loop only."""

    __slots__ = ("since", "windows")

    def __init__(self) -> None:
        self.windows: dict[str, Window] = {}
        self.since = time.monotonic()

    def record(self, instance: str, failed: bool, seconds: float, tokens: int = 0) -> None:
        window = self.windows.get(instance)
        if window is None:
            window = self.windows[instance] = Window()
        window.calls += 1
        if failed:
            window.errors += 1
        if tokens:
            window.tokens += tokens
        window.latency[bisect_left(histogram.BOUNDS, seconds)] += 1

    def take(self, router: Router) -> Snapshot:
        """Hand the windows over and start new ones, with each gate's queue facts."""
        windows, self.windows = self.windows, {}
        now = time.monotonic()
        seconds, self.since = now - self.since, now
        gates = {}
        for name, gate in router.gates.items():
            queued = len(gate.waiters)
            gates[name] = (max(gate.peak, queued), gate.in_flight)
            gate.peak = queued
        return Snapshot(seconds, windows, gates)


@dataclass(frozen=True)
class Snapshot:
    seconds: float
    windows: dict[str, Window]
    gates: dict[str, tuple[int, int]]  # instance -> (longest queue, calls in flight)


def response_tokens(data: bytes) -> int:
    """`metadata.compute_tokens` of a tei.v1 response whose field 2 is its Metadata
    (Embed*, Predict*, Rerank*); 0 when it has none, or the bytes do not parse."""
    tokens = 0
    pos, size = 0, len(data)
    try:
        while pos < size:
            key = data[pos]
            if key < 0x80:
                pos += 1
            else:
                key, pos = read_varint(data, pos)
            if key == 0x12:  # field 2, length-delimited: the Metadata
                length, pos = read_varint(data, pos)
                tokens = _compute_tokens(data, pos, pos + length)
                pos += length
            else:
                pos = skip_field(data, pos, key & 7)
    except WireError:
        return 0
    return tokens


def _compute_tokens(data: bytes, pos: int, end: int) -> int:
    """Metadata field 2 (compute_tokens, a varint) between `pos` and `end`."""
    while pos < end:
        key, pos = read_varint(data, pos)
        if key == 0x10:
            return read_varint(data, pos)[0]
        pos = skip_field(data, pos, key & 7)
    return 0
