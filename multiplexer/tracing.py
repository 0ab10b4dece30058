"""Spans of the data plane's hop: one SERVER span per gRPC call or HTTP request, child of
the client's `traceparent`, and the context the instance gets in its place.

With tracing off the Forwarder and the HTTP server hold no HopTracer and none of this
runs: the client's `traceparent` and `tracestate` reach the instance as they came (gRPC
metadata is passed on whole; HTTP passes those headers on as metadata). With tracing on
the instance gets the hop's `traceparent` instead, so its own spans hang under the
multiplexer's. The hop follows the client's sampled flag (a call without a traceparent
starts a sampled trace), as the SDK's default sampler does.

The event loop pays for a span only what it must: the parent's parse, two random ids, two
clock reads and one tuple appended when the call ends; telemetry/tracing.py's
SpanRecorder builds the SDK span on its own thread. The span carries the instance, the
status and the request id; service, method and route are in its name.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.trace import SpanKind

from telemetry.logs import REQUEST_ID_HEADER
from telemetry.tracing import (
    INSTANCE_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    TRACEPARENT,
    TRACESTATE,
    SpanRecorder,
    remote_parent,
)

SERVICE = "tei_multiplexer.v1.TeiMultiplexer"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
SAMPLED = 0x01
Metadata = tuple[tuple[str, str | bytes], ...]

_random = random.Random()  # the SDK's ids come from `random` too (RandomIdGenerator)


class Hop:
    """One call's span, as it goes: its ids, its start, and the W3C headers the instance
    gets for it."""

    __slots__ = (
        "attributes",
        "flags",
        "kind",
        "name",
        "outgoing",
        "parent",
        "recorder",
        "span_id",
        "start",
        "state",
        "trace_id",
    )

    def __init__(
        self,
        recorder: SpanRecorder,
        name: str,
        headers: dict[str, str],
        attributes: dict[str, Any],
    ) -> None:
        self.recorder, self.name, self.kind = recorder, name, SpanKind.SERVER
        self.attributes = attributes
        parent = remote_parent(headers) if TRACEPARENT in headers else None
        if parent is None:
            self.trace_id, self.flags, self.state = _random.getrandbits(128) or 1, SAMPLED, None
        else:
            self.trace_id, self.flags, self.state = (
                parent.trace_id,
                int(parent.trace_flags),
                parent.trace_state or None,
            )
        self.parent = parent
        self.span_id = _random.getrandbits(64) or 1
        traceparent = f"00-{self.trace_id:032x}-{self.span_id:016x}-{self.flags:02x}"
        self.outgoing: Metadata = (
            ((TRACEPARENT, traceparent),)
            if self.state is None
            else ((TRACEPARENT, traceparent), (TRACESTATE, self.state.to_header()))
        )
        self.start = time.time_ns()

    def forwarded(self, metadata: Iterable[tuple[str, Any]] | None) -> Metadata:
        """`metadata` with the client's trace headers replaced by this hop's."""
        kept = tuple(pair for pair in metadata or () if pair[0] not in TRACE_HEADERS)
        return kept + self.outgoing

    def end_grpc(self, instance: str, code: Any, message: str = "") -> None:
        number = code.value[0]
        error = None if number == 0 else f"{code.name}: {message}"[:256]
        self._end({INSTANCE_ATTRIBUTE: instance, "rpc.grpc.status_code": number}, error)

    def end_http(self, instance: str, status: int) -> None:
        error = f"HTTP {status}" if status >= 500 else None
        self._end({INSTANCE_ATTRIBUTE: instance, "http.response.status_code": status}, error)

    def _end(self, attributes: dict[str, Any], error: str | None) -> None:
        if not self.flags & SAMPLED:
            return  # the client's trace is not sampled: nothing to export
        attributes.update(self.attributes)
        self.recorder.record(
            (
                self.name,
                self.kind,
                self.trace_id,
                self.span_id,
                self.flags,
                self.state,
                self.parent,
                self.start,
                time.time_ns(),
                attributes,
                error,
            )
        )


class HopTracer:
    def __init__(self, recorder: SpanRecorder) -> None:
        self.recorder = recorder

    def grpc(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Hop:
        """The span of a TeiMultiplexer call, child of the client's traceparent if any."""
        headers = _trace_headers(metadata)
        request_id = headers.get(REQUEST_ID_HEADER)
        attributes = {REQUEST_ID_ATTRIBUTE: request_id} if request_id else {}
        return Hop(self.recorder, f"{SERVICE}/{method}", headers, attributes)

    def http(self, method: str, route: str, headers: Any, request_id: str | None) -> Hop:
        """The span of an HTTP request (`headers`: the request's, case-insensitive), named
        for its route as OpenTelemetry's HTTP conventions say."""
        carrier = {name: headers[name] for name in TRACE_HEADERS if name in headers}
        attributes = {REQUEST_ID_ATTRIBUTE: request_id} if request_id else {}
        return Hop(self.recorder, f"{method} {route}", carrier, attributes)


def _trace_headers(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    found = {}
    for key, value in metadata or ():
        if key in TRACE_HEADERS or key == REQUEST_ID_HEADER:
            found[key] = value if isinstance(value, str) else value.decode("latin-1")
    return found
