"""Spans of the data plane's hop: one SERVER span per gRPC call or HTTP request, child of
the client's `traceparent`, and the context the instance gets in its place.

With tracing off the Forwarder and the HTTP server hold no HopTracer and none of this
runs: the client's `traceparent` and `tracestate` reach the instance as they came (gRPC
metadata is passed on whole; HTTP passes those headers on as metadata). With tracing on
the instance gets the hop span's `traceparent` instead, so its own spans hang under the
multiplexer's. The span is never made current (no context attach and detach per call):
it is handed along explicitly and ended with the call's outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from telemetry.logs import REQUEST_ID_HEADER
from telemetry.tracing import (
    INSTANCE_ATTRIBUTE,
    REQUEST_ID_ATTRIBUTE,
    TRACEPARENT,
    TRACESTATE,
    extract,
    traceparent_of,
)

SERVICE = "tei_multiplexer.v1.TeiMultiplexer"
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
Metadata = tuple[tuple[str, str | bytes], ...]


class Hop:
    """One call's span and the W3C headers the instance gets for it."""

    __slots__ = ("outgoing", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        outgoing: list[tuple[str, str | bytes]] = [(TRACEPARENT, traceparent_of(span))]
        state = span.get_span_context().trace_state
        if state:
            outgoing.append((TRACESTATE, state.to_header()))
        self.outgoing: Metadata = tuple(outgoing)

    def forwarded(self, metadata: Iterable[tuple[str, Any]] | None) -> Metadata:
        """`metadata` with the client's trace headers replaced by this hop's."""
        kept = tuple(pair for pair in metadata or () if pair[0] not in TRACE_HEADERS)
        return kept + self.outgoing

    def end_grpc(self, instance: str, code: Any, message: str = "") -> None:
        span = self.span
        number = code.value[0]
        span.set_attributes({INSTANCE_ATTRIBUTE: instance, "rpc.grpc.status_code": number})
        if number != 0:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {message}"[:256]))
        span.end()

    def end_http(self, instance: str, status: int) -> None:
        span = self.span
        span.set_attributes({INSTANCE_ATTRIBUTE: instance, "http.response.status_code": status})
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class HopTracer:
    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    def grpc(self, method: str, metadata: Iterable[tuple[str, Any]] | None) -> Hop:
        """The span of a TeiMultiplexer call, child of the client's traceparent if any."""
        headers = _trace_headers(metadata)
        # Service and method are in the span's name: each attribute costs the SDK several
        # microseconds to check, so the span carries only what the name cannot.
        request_id = headers.get(REQUEST_ID_HEADER)
        attributes = {REQUEST_ID_ATTRIBUTE: request_id} if request_id else None
        span = self.tracer.start_span(
            f"{SERVICE}/{method}",
            context=extract(headers) if TRACEPARENT in headers else None,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        return Hop(span)

    def http(self, method: str, route: str, headers: Any, request_id: str | None) -> Hop:
        """The span of an HTTP request (`headers`: the request's, case-insensitive), named
        for its route as OpenTelemetry's HTTP conventions say."""
        carrier = {name: headers[name] for name in TRACE_HEADERS if name in headers}
        attributes = {REQUEST_ID_ATTRIBUTE: request_id} if request_id else None
        span = self.tracer.start_span(
            f"{method} {route}",
            context=extract(carrier) if TRACEPARENT in carrier else None,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        return Hop(span)


def _trace_headers(metadata: Iterable[tuple[str, Any]] | None) -> dict[str, str]:
    found = {}
    for key, value in metadata or ():
        if key in TRACE_HEADERS or key == REQUEST_ID_HEADER:
            found[key] = value if isinstance(value, str) else value.decode("latin-1")
    return found
