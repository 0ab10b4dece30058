"""gRPC garbage on the data plane: random, truncated and corrupted bytes on every
multiplexer method, malformed requests, and messages past what an instance takes.

A real multiplexer in front of a real localtei (all-MiniLM-L6-v2). Every call must end
with a status that says what was wrong (never UNKNOWN or INTERNAL, never an exception's
class name), and both servers must stay SERVING and keep answering.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.benchclient import text_batch
from multiplexer.forwarding import INSTANCE_MAX_MESSAGE_BYTES
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.localtei_fixtures import MINILM_ID, LocalTEI, start_localtei
from tests.test_multiplexer import wait_for_table

pytestmark = pytest.mark.django_db(transaction=True)

NODE = "grpc-fuzz-tests"  # no test worker serves it: nothing reconciles these rows
SEED = 9
CASES_PER_METHOD = 40
# What garbage may be answered with: it was wrong (INVALID_ARGUMENT), it names nothing
# known (NOT_FOUND), the model cannot do it (FAILED_PRECONDITION), it is too large
# (RESOURCE_EXHAUSTED, OUT_OF_RANGE), or it happened to be a valid request (OK).
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
NO_LIMIT = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
# Every method of the multiplexer but Health/Watch (a valid call waits for a change).
METHODS = [
    *mux.DESCRIPTOR.services_by_name["TeiMultiplexer"].methods,
    health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods_by_name[
        "ServerReflectionInfo"
    ],
]
# A valid inner request per tei.v1 type, for the valid calls that garbage is made from.
EXAMPLES = {
    "tei.v1.EmbedRequest": tei_pb2.EmbedRequest(inputs="fuzzing the wire", normalize=True),
    "tei.v1.EmbedSparseRequest": tei_pb2.EmbedSparseRequest(inputs="sparse words"),
    "tei.v1.EmbedAllRequest": tei_pb2.EmbedAllRequest(inputs="every token"),
    "tei.v1.PredictRequest": tei_pb2.PredictRequest(inputs="score this"),
    "tei.v1.PredictPairRequest": tei_pb2.PredictPairRequest(inputs=["a question", "an answer"]),
    "tei.v1.RerankRequest": tei_pb2.RerankRequest(query="what", texts=["one", "two"]),
    "tei.v1.RerankStreamRequest": tei_pb2.RerankStreamRequest(query="what", text="one"),
    "tei.v1.EncodeRequest": tei_pb2.EncodeRequest(inputs="Hello world", add_special_tokens=True),
    "tei.v1.DecodeRequest": tei_pb2.DecodeRequest(ids=[101, 7592, 2088, 102]),
}
BAD_UTF8 = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # field 1 (a string) holding invalid UTF-8
TRUNCATED = b"\x0a\x10abc"  # field 1 says 16 bytes, 3 follow


@pytest.fixture(scope="module")
def minilm() -> Iterator[LocalTEI]:
    with start_localtei(MINILM_ID) as server:
        yield server


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    with BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0)) as background:
        yield background


@pytest.fixture
def channel(multiplexer: BackgroundMultiplexer, minilm: LocalTEI) -> Iterator[grpc.Channel]:
    from instances.models import Instance

    Instance.objects.create(
        name="fuzz",
        model_id=MINILM_ID,
        port=minilm.port,
        prometheus_port=minilm.prometheus_port,
        status="running",
        node=NODE,
    )
    wait_for_table(multiplexer, {"fuzz": "running"})
    assert multiplexer.server is not None
    address = f"127.0.0.1:{multiplexer.server.port}"
    with grpc.insecure_channel(address, options=NO_LIMIT) as channel:
        yield channel


# Random and truncated bytes on every method -----------------------------------------------


def test_garbage_on_every_method_gets_a_proper_status_and_the_servers_stay_up(
    channel: grpc.Channel, minilm: LocalTEI
) -> None:
    rng = random.Random(SEED)
    wrong = []
    calls = 0
    for method in METHODS:
        valid = valid_wrapper(method)
        for case in range(CASES_PER_METHOD):
            messages = fuzz_messages(rng, method, valid, case)
            code, details = call(channel, method, messages)
            calls += 1
            if code not in ALLOWED or "<class" in details or "Traceback" in details:
                wrong.append(f"{method.name} {messages!r:.120}: {code.name} {details!r}")
    assert not wrong, f"{len(wrong)} of {calls} calls:\n" + "\n".join(wrong)
    assert_serving(channel)
    assert_serving(minilm.channel())
    stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
    good = stub.Embed(
        mux.EmbedRequest(target=fuzz_target(), request=EXAMPLES["tei.v1.EmbedRequest"])
    )
    assert len(good.embeddings) == 384


def fuzz_messages(
    rng: random.Random, method: MethodDescriptor, valid: bytes, case: int
) -> list[bytes]:
    """One call's messages: garbage made five ways, after a valid message on a stream."""
    kind = case % 5
    if kind == 0:  # random bytes
        garbage = rng.randbytes(rng.randrange(0, 48))
    elif kind == 1:  # a valid request cut short
        garbage = valid[: rng.randrange(0, len(valid))]
    elif kind == 2:  # a valid request with a few bytes changed
        corrupted = bytearray(valid)
        for _ in range(rng.randrange(1, 4)):
            corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
        garbage = bytes(corrupted)
    elif kind == 3:  # a valid target with random bytes for the request
        garbage = wrap(rng.randbytes(rng.randrange(1, 48)))
    else:  # a valid target with the inner request cut short
        inner = inner_of(method)
        garbage = wrap(inner[: rng.randrange(0, max(len(inner), 1))])
    if method.client_streaming and rng.random() < 0.5:
        return [valid, garbage]
    return [garbage]


# Malformed requests: INVALID_ARGUMENT, through the multiplexer and straight to localtei ---


@pytest.mark.parametrize("inner", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
def test_a_malformed_request_is_invalid_argument_through_the_multiplexer(
    channel: grpc.Channel, inner: bytes
) -> None:
    for name in ("Embed", "Decode", "EmbedStream", "TokenizeStream"):
        method = method_named(name)
        code, details = call(channel, method, [wrap(inner)])
        assert (code, details.startswith("malformed request")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            True,
        ), (name, details)
        assert "<class" not in details and "DecodeError" not in details


@pytest.mark.parametrize("inner", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
def test_a_malformed_request_is_invalid_argument_straight_to_localtei(
    minilm: LocalTEI, inner: bytes
) -> None:
    with minilm.channel() as direct:
        for path in (
            "/tei.v1.Embed/Embed",
            "/tei.v1.Tokenize/Decode",
            "/grpc.health.v1.Health/Check",
        ):
            with pytest.raises(grpc.RpcError) as caught:
                direct.unary_unary(path)(inner, timeout=10)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, path
            assert "malformed request: not a valid" in caught.value.details()
            assert "<class" not in caught.value.details()


@pytest.mark.parametrize("inner", [BAD_UTF8, TRUNCATED], ids=["bad-utf8", "truncated"])
def test_health_and_reflection_refuse_a_malformed_request(
    channel: grpc.Channel, minilm: LocalTEI, inner: bytes
) -> None:
    reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    watch = "/grpc.health.v1.Health/Watch"
    with minilm.channel() as direct:
        for server in (channel, direct):
            with pytest.raises(grpc.RpcError) as caught:
                list(server.unary_stream(watch)(inner, timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("malformed request: not a valid")
            with pytest.raises(grpc.RpcError) as caught:
                list(server.stream_stream(reflect)(iter([inner]), timeout=10))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith("malformed request: not a valid")


def test_a_malformed_message_ends_a_stream_with_invalid_argument_not_silently(
    channel: grpc.Channel, minilm: LocalTEI
) -> None:
    good = EXAMPLES["tei.v1.EmbedRequest"].SerializeToString()
    with minilm.channel() as direct:
        answers, error = stream(direct.stream_stream("/tei.v1.Embed/EmbedStream"), [good, BAD_UTF8])
    assert (len(answers), error.code()) == (1, grpc.StatusCode.INVALID_ARGUMENT), error.details()
    answers, error = stream(
        channel.stream_stream(f"/{SERVICE}/EmbedStream"), [wrap(good), wrap(BAD_UTF8), wrap(good)]
    )
    assert (len(answers), error.code()) == (1, grpc.StatusCode.INVALID_ARGUMENT), error.details()


# Message size: the multiplexer refuses what an instance would, and nothing less ------------


def test_a_request_larger_than_an_instance_takes_is_refused_naming_the_limit(
    channel: grpc.Channel,
) -> None:
    too_large = padded_embed_request(INSTANCE_MAX_MESSAGE_BYTES + 1)
    for name, messages in (
        ("Embed", [wrap(too_large)]),
        (
            "EmbedStream",
            [wrap(EXAMPLES["tei.v1.EmbedRequest"].SerializeToString()), wrap(too_large)],
        ),
    ):
        code, details = call(channel, method_named(name), messages)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (name, details)
        assert (
            f"larger than the {INSTANCE_MAX_MESSAGE_BYTES} bytes (4 MiB) an instance takes"
            in details
        )
    row = "x" * (INSTANCE_MAX_MESSAGE_BYTES + 1)
    arrow = mux.EmbedArrowRequest(target=fuzz_target(), arrow_ipc=text_batch(["short", row]))
    code, details = call(channel, method_named("EmbedArrow"), [arrow.SerializeToString()])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "4 MiB" in details, details


def test_a_request_of_exactly_the_limit_reaches_the_instance_and_is_answered(
    channel: grpc.Channel,
) -> None:
    exactly = padded_embed_request(INSTANCE_MAX_MESSAGE_BYTES)
    reply = channel.unary_unary(f"/{SERVICE}/Embed")(wrap(exactly), timeout=60)
    assert len(tei_pb2.EmbedResponse.FromString(reply).embeddings) == 384


def test_an_answer_larger_than_4_mib_comes_back_whole(channel: grpc.Channel) -> None:
    words = 220_000
    request = mux.EncodeRequest(
        target=fuzz_target(), request=tei_pb2.EncodeRequest(inputs="hello " * words)
    )
    reply = channel.unary_unary(f"/{SERVICE}/Tokenize")(request.SerializeToString(), timeout=120)
    assert len(reply) > INSTANCE_MAX_MESSAGE_BYTES
    tokens = tei_pb2.EncodeResponse.FromString(reply).tokens
    assert len(tokens) == words and tokens[-1].text == "hello"


# Helpers ---------------------------------------------------------------------------------

SERVICE = "tei_multiplexer.v1.TeiMultiplexer"


def call(channel: grpc.Channel, method: MethodDescriptor, messages: list[bytes]) -> tuple[Any, str]:
    """Send raw `messages` to `method`; (status code, details)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if not method.client_streaming:
            channel.unary_unary(path)(messages[0], timeout=30)
        elif method.server_streaming:
            list(channel.stream_stream(path)(iter(messages), timeout=30))
        else:
            channel.stream_unary(path)(iter(messages), timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def stream(multicallable: Any, messages: list[bytes]) -> tuple[list[bytes], grpc.RpcError]:
    answers: list[bytes] = []
    with pytest.raises(grpc.RpcError) as caught:
        for answer in multicallable(iter(messages), timeout=30):
            answers.append(answer)
    return answers, caught.value


def assert_serving(channel: grpc.Channel) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def method_named(name: str) -> MethodDescriptor:
    return next(method for method in METHODS if method.name == name)


def fuzz_target() -> mux.Target:
    return mux.Target(instance_name="fuzz")


def valid_wrapper(method: MethodDescriptor) -> bytes:
    """A valid request for `method`, the bytes garbage is made from."""
    if method.containing_service.full_name != SERVICE:  # health, reflection
        request = GetMessageClass(method.input_type)()
        field = "service" if "service" in request.DESCRIPTOR.fields_by_name else "list_services"
        setattr(request, field, SERVICE)
        return bytes(request.SerializeToString())
    wrapper = GetMessageClass(method.input_type)(target=fuzz_target())
    fields = wrapper.DESCRIPTOR.fields_by_name
    if "arrow_ipc" in fields:
        wrapper.arrow_ipc = text_batch(["fuzz me", "and me"])
    elif "request" in fields:
        example = EXAMPLES.get(fields["request"].message_type.full_name)
        if example is not None:
            wrapper.request.CopyFrom(example)
    return bytes(wrapper.SerializeToString())


def inner_of(method: MethodDescriptor) -> bytes:
    """Field 2 of a valid wrapper: the tei.v1 request, or the Arrow batch."""
    fields = GetMessageClass(method.input_type).DESCRIPTOR.fields_by_name
    if "arrow_ipc" in fields:
        return text_batch(["fuzz"])
    if "request" not in fields:
        return b""
    example = EXAMPLES.get(fields["request"].message_type.full_name)
    return example.SerializeToString() if example is not None else b""


def wrap(inner: bytes) -> bytes:
    """A wrapper with the fuzz target and `inner` as its request, whatever `inner` holds."""
    target = fuzz_target().SerializeToString()
    return b"\x0a" + varint(len(target)) + target + b"\x12" + varint(len(inner)) + inner


def padded_embed_request(size: int) -> bytes:
    """A valid EmbedRequest of exactly `size` bytes: a short input and an unknown field
    (number 15) that pads it, which the instance parses and ignores."""
    head = EXAMPLES["tei.v1.EmbedRequest"].SerializeToString()
    for length in range(size, 0, -1):
        field = b"\x7a" + varint(length)
        if len(head) + len(field) + length == size:
            return head + field + b"\x00" * length
    raise AssertionError(f"cannot pad to {size}")


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)
