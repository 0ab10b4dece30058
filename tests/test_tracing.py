"""W3C trace context across the data plane, OpenTelemetry spans for the hop and for the
lifecycle (create, launch, repair), and the request id they share with the logs.

The instance here is a stand-in that keeps the metadata of every call it gets; the spans
go to OpenTelemetry's in-memory exporter. tests/test_tracing_live.py exports over OTLP from
the real processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from instances import services, supervisor
from instances.models import Instance
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from telemetry import propagation, tracing
from telemetry.logs import REQUEST_ID
from tests.conftest import wait_until
from tests.http_client import add_row, request
from tests.test_multiplexer import rpc_error

pytestmark = pytest.mark.django_db(transaction=True)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
TRACESTATE = "vendor=opaque-value"
CLIENT = (("traceparent", TRACEPARENT), ("tracestate", TRACESTATE), ("x-request-id", "req-42"))


class RecordingInstance:
    """tei.v1 Embed that answers at once (an empty input is INVALID_ARGUMENT, as TEI has it)
    and keeps the metadata of every call."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.seen: list[dict[str, str]] = []
        handlers = {
            "Embed": grpc.unary_unary_rpc_method_handler(self._embed),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(self._embed_stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tei.v1.Embed", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _answer(self, request: bytes, context: Any) -> bytes:
        if not tei_pb2.EmbedRequest.FromString(request).inputs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty input")
        reply = tei_pb2.EmbedResponse(embeddings=[1.0], metadata=tei_pb2.Metadata(compute_tokens=3))
        return reply.SerializeToString()

    def _embed(self, request: bytes, context: Any) -> bytes:
        self.seen.append(dict(context.invocation_metadata()))
        return self._answer(request, context)

    def _embed_stream(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        self.seen.append(dict(context.invocation_metadata()))
        for request_ in requests:
            yield self._answer(request_, context)


@pytest.fixture(scope="module")
def instance() -> Iterator[RecordingInstance]:
    recording = RecordingInstance()
    yield recording
    recording.server.stop(0)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.configure("tei-manager-test", exporter=exporter, batch=False)
    yield exporter
    tracing.shutdown()


def serve(instance: RecordingInstance) -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, rollup_interval_secs=0)
    with BackgroundMultiplexer(options) as background:
        add_row("recorder", "recorder/model", instance.port)
        assert background.server is not None
        router = background.server.router
        wait_until(lambda: "recorder" in router.table.by_name, 10, "the recorder routable")
        yield background


@pytest.fixture
def plain(instance: RecordingInstance) -> Iterator[BackgroundMultiplexer]:
    assert tracing.tracer() is None
    yield from serve(instance)


@pytest.fixture
def traced(
    instance: RecordingInstance, spans: InMemorySpanExporter
) -> Iterator[BackgroundMultiplexer]:
    yield from serve(instance)


def finished(spans: InMemorySpanExporter) -> Any:
    """The spans ended so far (the hops' are built off the event loop: build them now)."""
    tracing.flush()
    return spans.get_finished_spans()


def stub(background: BackgroundMultiplexer) -> Any:
    assert background.server is not None
    channel = grpc.insecure_channel(f"127.0.0.1:{background.server.port}")
    return multiplexer_pb2_grpc.TeiMultiplexerStub(channel)


def embed(text: str = "hello") -> mux.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name="recorder"), request=tei_pb2.EmbedRequest(inputs=text)
    )


def http_base(background: BackgroundMultiplexer) -> str:
    assert background.server is not None
    return f"http://127.0.0.1:{background.server.http_port}/instances/recorder"


# -- tracing off: the client's context reaches the instance as it came ----------------------


def test_grpc_metadata_carries_the_client_s_trace_context_to_the_instance(
    plain: BackgroundMultiplexer, instance: RecordingInstance
) -> None:
    instance.seen.clear()
    stub(plain).Embed(embed(), metadata=CLIENT)
    list(stub(plain).EmbedStream(iter([embed("a"), embed("b")]), metadata=CLIENT))
    assert len(instance.seen) == 2
    for seen in instance.seen:
        assert seen["traceparent"] == TRACEPARENT
        assert seen["tracestate"] == TRACESTATE
        assert seen["x-request-id"] == "req-42"


def test_http_headers_reach_the_instance_as_metadata_with_a_request_id(
    plain: BackgroundMultiplexer, instance: RecordingInstance
) -> None:
    instance.seen.clear()
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE, "X-Request-ID": "req-7"}
    reply = request(f"{http_base(plain)}/embed", {"inputs": "hello"}, headers=headers)
    assert reply.status == 200 and reply.headers["x-request-id"] == "req-7"
    seen = instance.seen[-1]
    assert (seen["traceparent"], seen["tracestate"]) == (TRACEPARENT, TRACESTATE)
    assert seen["x-request-id"] == "req-7"
    # Without one, the multiplexer makes the id, and the client and the instance both see it.
    reply = request(f"{http_base(plain)}/embed", {"inputs": ["a", "b"]})
    made = reply.headers["x-request-id"]
    assert len(made) == 32 and instance.seen[-1]["x-request-id"] == made
    assert "traceparent" not in instance.seen[-1]
    # A header that is not a plain token is not taken as the id (it would go to the logs).
    reply = request(f"{http_base(plain)}/embed", {"inputs": "x"}, headers={"X-Request-ID": "a b"})
    assert reply.headers["x-request-id"] != "a b"


def test_tracing_is_off_unless_an_endpoint_is_configured(plain: BackgroundMultiplexer) -> None:
    assert tracing.configure("tei-manager-test", "") is False
    assert tracing.tracer() is None and tracing.carrier() == {}
    assert plain.server is not None and plain.server.hops is None
    with tracing.span("instance.create") as span:
        assert span is None


# -- tracing on: the hop is a span between the client's and the instance's -----------------


def test_a_grpc_call_is_a_server_span_under_the_client_s_and_over_the_instance_s(
    traced: BackgroundMultiplexer, instance: RecordingInstance, spans: InMemorySpanExporter
) -> None:
    instance.seen.clear()
    stub(traced).Embed(embed(), metadata=CLIENT)
    [span] = finished(spans)
    context = span.get_span_context()
    assert span.name == "tei_multiplexer.v1.TeiMultiplexer/Embed"
    assert span.kind == SpanKind.SERVER
    assert f"{context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    assert span.attributes is not None
    assert span.attributes["tei_manager.instance"] == "recorder"
    assert span.attributes["tei_manager.request_id"] == "req-42"
    assert span.attributes["rpc.grpc.status_code"] == 0
    seen = instance.seen[-1]
    assert seen["traceparent"] == f"00-{TRACE_ID}-{context.span_id:016x}-01"
    assert seen["tracestate"] == TRACESTATE
    assert seen["x-request-id"] == "req-42"


def test_failed_and_untraced_calls_and_streams_get_spans_too(
    traced: BackgroundMultiplexer, instance: RecordingInstance, spans: InMemorySpanExporter
) -> None:
    error = rpc_error(lambda: stub(traced).Embed(embed("")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    list(stub(traced).EmbedStream(iter([embed("a"), embed("b"), embed("c")])))
    failed, streamed = finished(spans)
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.parent is None  # no traceparent from the client: a new trace
    assert (
        streamed.name.endswith("/EmbedStream") and streamed.status.status_code != StatusCode.ERROR
    )
    assert instance.seen[-1]["traceparent"] == tracing.traceparent_of(streamed)


def test_an_http_request_is_a_span_named_for_its_route(
    traced: BackgroundMultiplexer, instance: RecordingInstance, spans: InMemorySpanExporter
) -> None:
    headers = {"traceparent": TRACEPARENT, "X-Request-ID": "req-http"}
    reply = request(f"{http_base(traced)}/embed", {"inputs": "hello"}, headers=headers)
    assert reply.status == 200
    [span] = finished(spans)
    context = span.get_span_context()
    assert span.name == "POST /instances/{name}/embed"
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    assert span.attributes is not None
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["tei_manager.request_id"] == "req-http"
    assert instance.seen[-1]["traceparent"] == f"00-{TRACE_ID}-{context.span_id:016x}-01"


# -- the lifecycle ----------------------------------------------------------------------


def test_create_is_a_span_with_the_request_id_and_its_launch_message_carries_it(
    spans: InMemorySpanExporter,
) -> None:
    token = REQUEST_ID.set("req-create")
    try:
        with tracing.span("POST /instances"):
            headers: dict[str, Any] = {}
            instance = services.create_instance(name="traced", model_id="fake/model")
            with tracing.span("publish"):
                propagation.carry_context(headers=headers)
    finally:
        REQUEST_ID.reset(token)
    by_name = {span.name: span for span in finished(spans)}
    create = by_name["instance.create"]
    assert create.attributes is not None
    assert create.attributes["tei_manager.request_id"] == "req-create"
    assert create.attributes["tei_manager.instance"] == "traced"
    assert (
        create.parent is not None
        and create.parent.span_id == by_name["POST /instances"].context.span_id
    )
    assert headers["x-request-id"] == "req-create"
    assert headers["traceparent"] == tracing.traceparent_of(by_name["publish"])
    assert instance.status == "pending"


def test_a_repair_is_a_span_and_the_relaunch_it_asks_for_carries_its_context(
    spans: InMemorySpanExporter,
) -> None:
    row = Instance.objects.create(
        name="dying", model_id="m", port=1, prometheus_port=2, status="running", pid=1,
        node="nowhere",
    )  # fmt: skip
    [work] = supervisor.reconcile_instance(row, alive=False, healthy=False)
    assert work.action == supervisor.LAUNCH
    [repair] = finished(spans)
    assert repair.name == "instance.repair" and repair.attributes is not None
    assert repair.attributes["tei_manager.instance"] == "dying"
    assert "exited" in str(repair.attributes["tei_manager.reason"])
    assert dict(work.trace)["traceparent"] == tracing.traceparent_of(repair)
    assert work == supervisor.Work(supervisor.LAUNCH, row.pk)  # the trace is not identity


def test_a_task_takes_the_request_id_its_message_carried() -> None:
    class Request:
        def __init__(self, headers: dict[str, str]) -> None:
            self.headers = headers

        def get(self, key: str) -> str | None:
            return self.headers.get(key)

    class Task:
        request = Request({"x-request-id": "req-9", "traceparent": TRACEPARENT})

    propagation.adopt_request_id(task=Task(), task_id="task-1")
    assert REQUEST_ID.get() == "req-9"
    assert propagation.task_trace(Task.request) == {"traceparent": TRACEPARENT}
    Task.request = Request({})
    propagation.adopt_request_id(task=Task(), task_id="task-2")
    assert REQUEST_ID.get() == "task-2"
    propagation.forget_request_id()
    assert REQUEST_ID.get() is None


def test_a_call_the_client_does_not_sample_is_passed_on_unsampled_and_not_exported(
    traced: BackgroundMultiplexer, instance: RecordingInstance, spans: InMemorySpanExporter
) -> None:
    unsampled = f"00-{TRACE_ID}-{CLIENT_SPAN}-00"
    stub(traced).Embed(embed(), metadata=(("traceparent", unsampled),))
    assert finished(spans) == ()
    forwarded = instance.seen[-1]["traceparent"]
    assert forwarded.startswith(f"00-{TRACE_ID}-") and forwarded.endswith("-00")
    assert forwarded != unsampled  # the hop is the instance's parent all the same


def test_the_recorder_exports_the_hops_on_its_own(
    traced: BackgroundMultiplexer, spans: InMemorySpanExporter
) -> None:
    stub(traced).Embed(embed(), metadata=CLIENT)
    wait_until(lambda: len(spans.get_finished_spans()) == 1, 10, "the hop exported unasked")
