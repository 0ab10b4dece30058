"""OpenTelemetry traces: spans for the multiplexer's hop and the lifecycle (create, launch,
health repair), exported over OTLP/HTTP when `otlp_endpoint` (OTEL_EXPORTER_OTLP_ENDPOINT)
is set. Off by default, and then free: no provider, no exporter thread, and every hook
is one test of `tracer() is None`.

Context travels as W3C Trace Context (`traceparent`, `tracestate`): in gRPC metadata and
HTTP headers on the data plane, in Celery message headers from the web to the worker.
The provider is this module's own, not OpenTelemetry's global one, so that a test can
install an in-memory exporter and take it away again. The data plane's hops do not go
through the SDK's tracer on the event loop: they are recorded as tuples and built into
SDK spans by SpanRecorder's thread (the SDK's span start and end cost tens of
microseconds a call, its attribute checks most of them). The SDK still reads its usual
variables (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_EXPORTER_OTLP_HEADERS,
OTEL_TRACES_SAMPLER, OTEL_BSP_*).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger(__name__)

TRACEPARENT, TRACESTATE = "traceparent", "tracestate"
REQUEST_ID_ATTRIBUTE = "tei_manager.request_id"
INSTANCE_ATTRIBUTE = "tei_manager.instance"
PROPAGATOR = TraceContextTextMapPropagator()

SCOPE = InstrumentationScope("tei-manager")

_provider: TracerProvider | None = None
_processor: SpanProcessor | None = None
_tracer: trace.Tracer | None = None
_recorder: SpanRecorder | None = None


def configure(
    service: str,
    endpoint: str = "",
    *,
    exporter: SpanExporter | None = None,
    batch: bool = True,
) -> bool:
    """Start exporting this process's spans: to OTLP/HTTP at `endpoint` (the base URL, as
    OTEL_EXPORTER_OTLP_ENDPOINT gives it), or to `exporter`. False (tracing stays off)
    when neither is given."""
    global _provider, _processor, _tracer
    if exporter is None:
        if not endpoint:
            return False
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=traces_url(endpoint))
    shutdown()
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    _provider, _processor, _tracer = provider, processor, provider.get_tracer("tei-manager")
    return True


def shutdown() -> None:
    """Export what is buffered and stop (a process on its way out, a test done)."""
    global _provider, _processor, _tracer, _recorder
    provider, recorder = _provider, _recorder
    _provider, _processor, _tracer, _recorder = None, None, None, None
    if recorder is not None:
        recorder.stop()
    if provider is not None:
        provider.shutdown()


def flush(timeout_ms: int = 5000) -> None:
    """Build the recorded hops' spans and export everything buffered, now."""
    if _recorder is not None:
        _recorder.drain()
    if _provider is not None:
        _provider.force_flush(timeout_ms)


def recorder() -> SpanRecorder | None:
    """Where the data plane records its hops (started on first use: only the multiplexer
    has hops), or None when tracing is off."""
    global _recorder
    if _recorder is None and _provider is not None and _processor is not None:
        _recorder = SpanRecorder(_processor, _provider.resource)
    return _recorder


# name, kind, trace id, span id, trace flags, trace state, parent, start and end (ns),
# attributes, error description (None: not an error)
Recorded = tuple[
    str, SpanKind, int, int, int, Any, SpanContext | None, int, int, dict[str, Any], str | None
]


class SpanRecorder:
    """Builds SDK spans from recorded tuples, on a thread of its own.

    `record` is a deque append (thread-safe, no lock, no wake-up); every `interval` seconds
    the thread turns what was recorded into ReadableSpans and hands them to the exporting
    processor. Past `max_pending` spans waiting, the oldest go, as the batch processor
    drops spans past its queue.
    """

    def __init__(
        self,
        processor: SpanProcessor,
        resource: Resource,
        interval: float = 0.2,
        max_pending: int = 8192,
    ) -> None:
        self.processor = processor
        self.resource = resource
        self.interval = interval
        self._pending: deque[Recorded] = deque(maxlen=max_pending)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="span-recorder", daemon=True)
        self._thread.start()

    def record(self, span: Recorded) -> None:
        self._pending.append(span)

    def drain(self) -> int:
        """Build and hand on every span recorded so far; how many."""
        built = 0
        while True:
            try:
                recorded = self._pending.popleft()
            except IndexError:
                return built
            self.processor.on_end(self._build(recorded))
            built += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.drain()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.drain()
            except Exception:
                log.exception("cannot build the recorded spans")

    def _build(self, recorded: Recorded) -> ReadableSpan:
        name, kind, trace_id, span_id, flags, state, parent, start, end, attributes, error = (
            recorded
        )
        status = Status(StatusCode.UNSET) if error is None else Status(StatusCode.ERROR, error)
        return ReadableSpan(
            name,
            context=SpanContext(trace_id, span_id, False, TraceFlags(flags), state),
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=kind,
            status=status,
            start_time=start,
            end_time=end,
            instrumentation_scope=SCOPE,
        )


def tracer() -> trace.Tracer | None:
    """The tracer, or None when tracing is off."""
    return _tracer


def traces_url(endpoint: str) -> str:
    """OTLP/HTTP's traces path under the base endpoint, as the SDK itself derives it."""
    return endpoint.rstrip("/") + "/v1/traces"


@contextmanager
def span(
    name: str,
    *,
    parent: Mapping[str, Any] | None = None,
    attributes: Mapping[str, Any] | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> Iterator[trace.Span | None]:
    """A span made current for the block (None when tracing is off), child of `parent`
    (a carrier with `traceparent`) or of the current span. It names the request id."""
    if _tracer is None:
        yield None
        return
    from telemetry.logs import REQUEST_ID

    context = PROPAGATOR.extract(parent) if parent else None
    with _tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=attributes
    ) as current:
        request_id = REQUEST_ID.get()
        if request_id:
            current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)
        yield current


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers; {} when there is none."""
    if _tracer is None:
        return {}
    headers: dict[str, str] = {}
    PROPAGATOR.inject(headers)
    return headers


def current_ids() -> tuple[str | None, str | None]:
    """(trace_id, span_id) of the current span, in hex; (None, None) without one."""
    if _tracer is None:
        return None, None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def traceparent_of(span: trace.Span) -> str:
    """`span`'s context as a W3C traceparent value."""
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def extract(headers: Mapping[str, Any]) -> otel_context.Context:
    return PROPAGATOR.extract(headers)


def remote_parent(headers: Mapping[str, Any]) -> SpanContext | None:
    """The span context a `traceparent` (and `tracestate`) names, if it is a valid one."""
    context = trace.get_current_span(PROPAGATOR.extract(headers)).get_span_context()
    return context if context.is_valid else None
