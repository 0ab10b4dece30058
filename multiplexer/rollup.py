"""The traffic roll-up: every 10 seconds the routing refresher thread collects the traffic
windows from the event loop (multiplexer/traffic.py) and writes them as one batch of
TrafficSample rows, one per instance: no write per call. Instances that are running get
a row even without calls, so a chart shows zero rather than a gap. Samples older than 24
hours are deleted once a minute.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from multiplexer import metrics
from multiplexer.metrics import UNROUTED
from multiplexer.options import ROLLUP_SECS
from multiplexer.routing import RoutingTable
from multiplexer.traffic import Snapshot
from telemetry import histogram, series
from telemetry.models import TrafficSample


class Rollup:
    """Writes one batch of samples every `interval` seconds, from the refresher thread.

    `collect` fetches a Snapshot (from the event loop); the samples are stamped with the
    end of the window, a whole multiple of the interval in epoch seconds.
    """

    def __init__(
        self,
        collect: Callable[[], Snapshot],
        source: str,
        interval: float = ROLLUP_SECS,
        prune_every: float = 60.0,
    ) -> None:
        self.collect = collect
        self.source = source
        self.interval = interval
        self.prune_every = prune_every
        self._next = self._boundary_after(time.time())
        self._next_prune = 0.0

    def due(self, now: float) -> bool:
        return self.interval > 0 and now >= self._next

    def run(self, table: RoutingTable, now: float | None = None) -> int:
        """Collect and write one batch; the number of rows written."""
        now = time.time() if now is None else now
        started = time.perf_counter()
        at = int(now // self.interval * self.interval) if self.interval >= 1 else int(now)
        self._next = self._boundary_after(now)
        snapshot = self.collect()
        rows = samples(snapshot, table)
        written = series.record_traffic(at, self.source, rows)
        for row in rows:
            if row.tokens:
                metrics.tokens_reported(row.instance, row.tokens)
        if now >= self._next_prune:
            series.prune(TrafficSample, now)
            self._next_prune = now + self.prune_every
        metrics.rollup_done(time.perf_counter() - started, written)
        return written

    def _boundary_after(self, now: float) -> float:
        if self.interval <= 0:
            return float("inf")
        return (now // self.interval + 1) * self.interval


def samples(snapshot: Snapshot, table: RoutingTable) -> list[series.InstanceWindow]:
    """A row for every instance that had calls, and every running one (idle: zeros)."""
    names = set(snapshot.windows) | {route.name for route in table.running}
    names.discard(UNROUTED)
    rows = []
    for name in sorted(names):
        window = snapshot.windows.get(name)
        queue_depth, in_flight = snapshot.gates.get(name, (0, 0))
        if window is None:
            rows.append(
                series.InstanceWindow(
                    name, snapshot.seconds, queue_depth=queue_depth, in_flight=in_flight
                )
            )
            continue
        rows.append(
            series.InstanceWindow(
                instance=name,
                seconds=snapshot.seconds,
                calls=window.calls,
                errors=window.errors,
                tokens=window.tokens,
                latency=histogram.sparse(window.latency),
                queue_depth=queue_depth,
                in_flight=in_flight,
            )
        )
    return rows
