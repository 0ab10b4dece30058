"""The multiplexer end to end: real localtei instances, a real server on loopback.

Every call through the multiplexer is compared with the same call made directly to the
instance. The instances (minilm, a tiny SPLADE, two tiny rerankers) live for the module;
each test inserts its Instance rows and waits until the multiplexer's table shows them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
import pytest
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from localtei.settings import event_loop_factory
from multiplexer.benchclient import text_batch
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.conftest import ROOT, TEST_ENV
from tests.localtei_fixtures import (
    MINILM_ID,
    LocalTEI,
    build_tiny_model,
    free_port,
    launch_localtei,
)

pytestmark = pytest.mark.django_db(transaction=True)

RERANKER_ID = "tiny/reranker"
NODE = "multiplexer-tests"  # no test worker serves it: nothing reconciles these rows


# Fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalTEI]]:
    """minilm, a tiny SPLADE and two replicas of a tiny reranker, started side by side."""
    models = tmp_path_factory.mktemp("models")
    splade = build_tiny_model("splade", models / "splade")
    reranker = build_tiny_model("reranker", models / "reranker")
    started = {
        "minilm": launch_localtei(MINILM_ID),
        "splade": launch_localtei(splade, "--pooling", "splade"),
        "rerank-a": launch_localtei(reranker),
        "rerank-b": launch_localtei(reranker),
    }
    try:
        for server in started.values():
            server.wait_until_serving()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    with BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0)) as background:
        yield background


@pytest.fixture(scope="module")
def impatient_multiplexer() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, request_timeout_secs=0.5)
    with BackgroundMultiplexer(options) as background:
        yield background


@pytest.fixture(scope="module")
def small_multiplexer() -> Iterator[BackgroundMultiplexer]:
    with BackgroundMultiplexer(
        ServerOptions(host="127.0.0.1", port=0, max_message_size_mb=1)
    ) as background:
        yield background


@pytest.fixture
def rows(servers: dict[str, LocalTEI]) -> dict[str, Any]:
    """One running Instance row per server; the reranker replicas share a model id."""
    from instances.models import Instance

    model_ids = {"minilm": MINILM_ID, "splade": "tiny/splade"}
    created = {}
    for name, server in servers.items():
        created[name] = Instance.objects.create(
            name=name,
            model_id=model_ids.get(name, RERANKER_ID),
            port=server.port,
            prometheus_port=server.prometheus_port,
            status="running",
            node=NODE,
        )
    return created


@pytest.fixture
def stub(
    multiplexer: BackgroundMultiplexer, rows: dict[str, Any]
) -> Iterator[multiplexer_pb2_grpc.TeiMultiplexerStub]:
    wait_for_table(multiplexer, {name: "running" for name in rows})
    with grpc.insecure_channel(f"127.0.0.1:{multiplexer.server.port}") as channel:  # type: ignore[union-attr]
        yield multiplexer_pb2_grpc.TeiMultiplexerStub(channel)


def wait_for_table(
    background: BackgroundMultiplexer, expected: dict[str, str], timeout: float = 5.0
) -> float:
    """Wait until the routing table holds exactly `expected` (name -> status)."""
    return wait_for_read(
        background,
        lambda table: {n: r.status for n, r in table.by_name.items()} == expected,
        f"the routing table never held {expected}",
        timeout,
    )


def wait_for_read(
    background: BackgroundMultiplexer,
    holds: Callable[[Any], bool],
    what: str,
    timeout: float = 5.0,
) -> float:
    """Wait until `holds(routing table)`, as a read that began after this call found it;
    return the seconds waited.

    A table read earlier may hold by chance: the previous test's rows, flushed at its end
    and written again under the same names. A read taken between that flush and the new
    rows would then replace it a moment later with a table that lacks them.
    """
    assert background.server is not None
    router, refresher = background.server.router, background.server.refresher
    started = time.monotonic()
    while refresher.last_read_began < started or not holds(router.table):
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}; the routing table: {dict(router.table.by_name)}")
        time.sleep(0.02)
    return time.monotonic() - started


def add_instance(
    background: BackgroundMultiplexer,
    rows: dict[str, Any],
    name: str,
    port: int,
    status: str = "running",
) -> None:
    """One more Instance row (model `<name>/model`) beside `rows`; returns once routable."""
    from instances.models import Instance

    Instance.objects.create(
        name=name,
        model_id=f"{name}/model",
        port=port,
        prometheus_port=2,
        status=status,
        node=NODE,
    )
    wait_for_table(background, {**{n: "running" for n in rows}, name: status})


def target(name: str) -> mux.Target:
    return mux.Target(instance_name=name)


def direct(server: LocalTEI, method: str, request: Message, streaming: bool = False) -> Any:
    """Call `method` on the instance itself, with the tei.v1 classes."""
    service, output = UPSTREAM[method]
    with server.channel() as channel:
        path = f"/tei.v1.{service}/{method}"
        if streaming:
            call = channel.stream_stream(path, lambda m: m.SerializeToString(), output.FromString)
            return list(call(iter(request)))  # type: ignore[call-overload]
        call = channel.unary_unary(path, lambda m: m.SerializeToString(), output.FromString)
        return call(request)


def _upstream() -> dict[str, tuple[str, type[Message]]]:
    table = {}
    for service in tei_pb2.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            table[method.name] = (service.name, getattr(tei_pb2, method.output_type.name))
    return table


UPSTREAM = _upstream()


def comparable(message: Message) -> dict[str, Any]:
    """The message as a dict, without its timings (metadata differs per call)."""
    data = MessageToDict(message, preserving_proto_field_name=True)
    data.pop("metadata", None)
    return data


def assert_close(got: Any, want: Any, path: str = "") -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            assert_close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-5), f"{path}: {got} != {want}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, Message):
            list(result)
    return caught.value


# Every RPC, unary and streaming ---------------------------------------------------------

UNARY = [
    ("Info", "minilm", None),
    ("Embed", "minilm", tei_pb2.EmbedRequest(inputs="The quick brown fox", normalize=True)),
    ("EmbedSparse", "splade", tei_pb2.EmbedSparseRequest(inputs="sparse words here")),
    ("EmbedAll", "minilm", tei_pb2.EmbedAllRequest(inputs="every token")),
    ("Predict", "rerank-a", tei_pb2.PredictRequest(inputs="score this", raw_scores=True)),
    ("PredictPair", "rerank-a", tei_pb2.PredictPairRequest(inputs=["a question", "an answer"])),
    (
        "Rerank",
        "rerank-a",
        tei_pb2.RerankRequest(query="what", texts=["one", "two words", "three"], return_text=True),
    ),
    ("Tokenize", "minilm", tei_pb2.EncodeRequest(inputs="Hello world", add_special_tokens=True)),
    ("Decode", "minilm", tei_pb2.DecodeRequest(ids=[101, 7592, 2088, 102])),
]


def test_it_forwards_every_unary_rpc_unchanged(stub: Any, servers: dict[str, LocalTEI]) -> None:
    for method, instance, inner in UNARY:
        wrapper_class = getattr(mux, type(inner).__name__ if inner else "InfoRequest")
        wrapper = wrapper_class(target=target(instance))
        if inner is not None:
            wrapper.request.CopyFrom(inner)
        got = getattr(stub, method)(wrapper)
        want = direct(servers[instance], method, inner or tei_pb2.InfoRequest())
        assert comparable(got) == comparable(want), method


STREAMS = [
    ("EmbedStream", "minilm", [tei_pb2.EmbedRequest(inputs=f"text number {i}") for i in range(20)]),
    (
        "EmbedSparseStream",
        "splade",
        [tei_pb2.EmbedSparseRequest(inputs=f"sparse {i}") for i in range(5)],
    ),
    ("EmbedAllStream", "minilm", [tei_pb2.EmbedAllRequest(inputs=f"all {i}") for i in range(3)]),
    ("PredictStream", "rerank-a", [tei_pb2.PredictRequest(inputs=f"p {i}") for i in range(5)]),
    (
        "PredictPairStream",
        "rerank-a",
        [tei_pb2.PredictPairRequest(inputs=[f"q {i}", f"a {i}"]) for i in range(5)],
    ),
    ("TokenizeStream", "minilm", [tei_pb2.EncodeRequest(inputs=f"tok {i}") for i in range(5)]),
    ("DecodeStream", "minilm", [tei_pb2.DecodeRequest(ids=[7592 + i]) for i in range(5)]),
]


def test_it_forwards_every_stream_in_order(stub: Any, servers: dict[str, LocalTEI]) -> None:
    for method, instance, inners in STREAMS:
        wrapper_class = getattr(mux, type(inners[0]).__name__)
        wrappers = [wrapper_class(target=target(instance), request=inner) for inner in inners]
        got = [comparable(m) for m in getattr(stub, method)(iter(wrappers))]
        # Each message alone, directly: a stream must answer in the order it was asked.
        want = [comparable(direct(servers[instance], method[: -len("Stream")], m)) for m in inners]
        assert_close(got, want, method)


def test_it_forwards_a_rerank_stream_as_one_answer(stub: Any, servers: dict[str, LocalTEI]) -> None:
    inners = [
        tei_pb2.RerankStreamRequest(query="what", text=text, return_text=True)
        for text in ("one", "two words", "three")
    ]
    got = stub.RerankStream(
        iter(mux.RerankStreamRequest(target=target("rerank-a"), request=m) for m in inners)
    )
    want = direct(servers["rerank-a"], "RerankStream", inners, streaming=True)
    assert_close(comparable(got), comparable(want[0]))


def test_it_passes_instance_errors_through_unchanged(
    stub: Any, servers: dict[str, LocalTEI]
) -> None:
    empty = tei_pb2.EmbedRequest(inputs="")
    got = rpc_error(lambda: stub.Embed(mux.EmbedRequest(target=target("minilm"), request=empty)))
    want = rpc_error(lambda: direct(servers["minilm"], "Embed", empty))
    assert (got.code(), got.details()) == (want.code(), want.details())
    assert got.code() == grpc.StatusCode.INVALID_ARGUMENT

    not_a_reranker = tei_pb2.RerankRequest(query="q", texts=["a"])
    got = rpc_error(
        lambda: stub.Rerank(mux.RerankRequest(target=target("minilm"), request=not_a_reranker))
    )
    want = rpc_error(lambda: direct(servers["minilm"], "Rerank", not_a_reranker))
    assert (got.code(), got.details()) == (want.code(), want.details())

    inners = [tei_pb2.EmbedRequest(inputs=t) for t in ("fine", "also fine", "", "never")]
    got = rpc_error(
        lambda: stub.EmbedStream(
            iter(mux.EmbedRequest(target=target("minilm"), request=m) for m in inners)
        )
    )
    want = rpc_error(lambda: direct(servers["minilm"], "EmbedStream", inners, streaming=True))
    assert (got.code(), got.details()) == (want.code(), want.details())


def test_an_instance_error_mid_stream_reaches_the_client_while_it_is_still_sending(
    stub: Any, servers: dict[str, LocalTEI]
) -> None:
    """The instance ends the stream at message 3 of 300 while the multiplexer is still
    writing: the client gets the instance's status every time, never gRPC's own INTERNAL."""
    inners = [tei_pb2.EmbedRequest(inputs="" if i == 2 else f"text {i}") for i in range(300)]
    want = rpc_error(lambda: direct(servers["minilm"], "EmbedStream", inners, streaming=True))
    assert want.code() == grpc.StatusCode.INVALID_ARGUMENT
    for _ in range(15):
        got = rpc_error(
            lambda: stub.EmbedStream(
                iter([mux.EmbedRequest(target=target("minilm"), request=m) for m in inners])
            )
        )
        assert (got.code(), got.details()) == (want.code(), want.details())

    texts = [" ".join(["word"] * 300)] * 8
    bad = [tei_pb2.RerankStreamRequest(query="q", text=t) for t in texts]
    want = rpc_error(lambda: direct(servers["minilm"], "RerankStream", bad, streaming=True))
    assert want.code() == grpc.StatusCode.FAILED_PRECONDITION  # not a reranker
    for _ in range(5):
        got = rpc_error(
            lambda: stub.RerankStream(
                iter([mux.RerankStreamRequest(target=target("minilm"), request=m) for m in bad])
            )
        )
        assert (got.code(), got.details()) == (want.code(), want.details())


@pytest.fixture
def stalled_server() -> Iterator[int]:
    """A gRPC server that takes an EmbedStream and reads none of its messages."""
    from concurrent import futures

    release = threading.Event()

    def stall(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        context.add_callback(release.set)
        release.wait(30)
        return iter(())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "tei.v1.Embed", {"EmbedStream": grpc.stream_stream_rpc_method_handler(stall)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    release.set()
    server.stop(0)


def test_a_stream_to_an_instance_that_reads_nothing_holds_back_its_client(
    stub: Any, multiplexer: BackgroundMultiplexer, rows: dict[str, Any], stalled_server: int
) -> None:
    """Flow control reaches through the multiplexer: it buffers a bounded amount, so a
    client streaming 150 MB to an instance that reads nothing is made to wait."""
    add_instance(multiplexer, rows, "stalled", stalled_server)
    count, total = 300, 300 * 512 * 1024
    message = mux.EmbedRequest(
        target=target("stalled"), request=tei_pb2.EmbedRequest(inputs="x" * (512 * 1024))
    )
    sent = 0

    def requests() -> Iterator[mux.EmbedRequest]:
        nonlocal sent
        for _ in range(count):
            sent += 1
            yield message

    responses = stub.EmbedStream(requests(), timeout=60)
    reader = threading.Thread(target=lambda: rpc_error(lambda: list(responses)), daemon=True)
    reader.start()
    time.sleep(4)
    held_back_at = sent
    responses.cancel()
    reader.join(10)
    assert 0 < held_back_at < count // 2, f"the client got {held_back_at} of {count} messages out"
    assert held_back_at * 512 * 1024 < total // 2


# Routing --------------------------------------------------------------------------------


def request_counts(server: LocalTEI, method: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.prometheus_port}/metrics") as page:
        text = page.read().decode()
    found = re.search(rf'^te_request_count_total{{method="{method}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_it_spreads_a_model_over_its_running_replicas(
    stub: Any, servers: dict[str, LocalTEI]
) -> None:
    before = {name: request_counts(servers[name], "predict") for name in ("rerank-a", "rerank-b")}
    request = mux.PredictRequest(
        target=mux.Target(model_id=RERANKER_ID), request=tei_pb2.PredictRequest(inputs="x")
    )
    for _ in range(10):
        stub.Predict(request)
    after = {name: request_counts(servers[name], "predict") for name in before}
    assert after["rerank-a"] - before["rerank-a"] == 5
    assert after["rerank-b"] - before["rerank-b"] == 5


def test_it_routes_by_position_among_running_instances(
    stub: Any, servers: dict[str, LocalTEI]
) -> None:
    for index, name in enumerate(sorted(servers)):
        before = {n: request_counts(server, "info") for n, server in servers.items()}
        stub.Info(mux.InfoRequest(target=mux.Target(instance_index=index)))
        after = {n: request_counts(server, "info") for n, server in servers.items()}
        assert {n for n in servers if after[n] > before[n]} == {name}


def test_it_maps_routing_failures_to_status_codes(
    stub: Any, multiplexer: BackgroundMultiplexer, rows: dict[str, Any]
) -> None:
    add_instance(multiplexer, rows, "stopped-one", free_port(), status="stopped")
    embed = tei_pb2.EmbedRequest(inputs="x")
    cases = [
        (mux.Target(instance_name="nope"), grpc.StatusCode.NOT_FOUND, "instance 'nope' not found"),
        (mux.Target(instance_name="stopped-one"), grpc.StatusCode.UNAVAILABLE, "not running"),
        (mux.Target(model_id="no/such-model"), grpc.StatusCode.NOT_FOUND, "no instance serves"),
        (
            mux.Target(model_id="stopped-one/model"),
            grpc.StatusCode.UNAVAILABLE,
            "no running instance",
        ),
        (mux.Target(instance_index=4), grpc.StatusCode.NOT_FOUND, "4 is out of range: 4 running"),
        (None, grpc.StatusCode.INVALID_ARGUMENT, "no target"),
    ]
    for where, code, message in cases:
        request = mux.EmbedRequest(request=embed)
        if where is not None:
            request.target.CopyFrom(where)
        error = rpc_error(lambda r=request: stub.Embed(r))  # type: ignore[misc]
        assert error.code() == code and message in error.details(), (where, error)

    with grpc.insecure_channel(f"127.0.0.1:{multiplexer.server.port}") as channel:  # type: ignore[union-attr]
        raw = channel.unary_unary("/tei_multiplexer.v1.TeiMultiplexer/Embed")
        error = rpc_error(lambda: raw(b"\x0a\x09garbage"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in error.details()
        error = rpc_error(
            lambda: channel.stream_unary("/tei_multiplexer.v1.TeiMultiplexer/RerankStream")(
                iter([])
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

        # A bidirectional stream: nothing in, nothing out; a malformed message ends it.
        embed_stream = channel.stream_stream("/tei_multiplexer.v1.TeiMultiplexer/EmbedStream")
        assert list(embed_stream(iter([]))) == []
        good = mux.EmbedRequest(target=target("minilm"), request=embed).SerializeToString()
        error = rpc_error(lambda: embed_stream(iter([good, b"\x0a\x09garbage", good])))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request" in error.details()


def test_it_sees_created_stopped_and_deleted_instances_within_a_second(
    stub: Any, multiplexer: BackgroundMultiplexer, rows: dict[str, Any], servers: Any
) -> None:
    from instances.models import Instance

    request = mux.InfoRequest(target=target("late-one"))
    assert rpc_error(lambda: stub.Info(request)).code() == grpc.StatusCode.NOT_FOUND
    expected = {n: "running" for n in rows}

    Instance.objects.create(
        name="late-one",
        model_id=MINILM_ID,
        port=servers["minilm"].port,
        prometheus_port=servers["minilm"].prometheus_port,
        node="elsewhere",
        status="running",
    )
    assert wait_for_table(multiplexer, {**expected, "late-one": "running"}) < 1.0
    assert stub.Info(request).model_id == MINILM_ID

    Instance.objects.filter(name="late-one").update(status="stopped")
    assert wait_for_table(multiplexer, {**expected, "late-one": "stopped"}) < 1.0
    assert rpc_error(lambda: stub.Info(request)).code() == grpc.StatusCode.UNAVAILABLE

    Instance.objects.filter(name="late-one").delete()
    assert wait_for_table(multiplexer, expected) < 1.0
    assert rpc_error(lambda: stub.Info(request)).code() == grpc.StatusCode.NOT_FOUND


def test_it_ends_a_call_at_the_deadline(
    impatient_multiplexer: BackgroundMultiplexer, rows: dict[str, Any]
) -> None:
    # A port that accepts connections and never speaks HTTP/2: the call can only time out.
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(8)
        add_instance(impatient_multiplexer, rows, "silent", blackhole.getsockname()[1])
        port = impatient_multiplexer.server.port  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            started = time.monotonic()
            error = rpc_error(lambda: stub.Info(mux.InfoRequest(target=target("silent"))))
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert 0.4 < time.monotonic() - started < 3
            # The client's own, shorter deadline wins.
            started = time.monotonic()
            error = rpc_error(
                lambda: stub.Info(mux.InfoRequest(target=target("silent")), timeout=0.2)
            )
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 0.45


@pytest.fixture
def mute_server() -> Iterator[int]:
    """A gRPC server that takes every stream and never answers (until cancelled)."""
    from concurrent import futures

    def hang(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        cancelled = threading.Event()
        context.add_callback(cancelled.set)
        for _ in requests:
            pass
        cancelled.wait(30)
        return iter(())

    handlers = {
        "Embed": grpc.stream_stream_rpc_method_handler(hang),
        "Rerank": grpc.stream_unary_rpc_method_handler(lambda r, c: b"".join(hang(r, c))),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(f"tei.v1.{service}", {f"{service}Stream": h})
            for service, h in handlers.items()
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def test_a_stream_ends_when_its_instance_owes_an_answer_and_stays_silent(
    impatient_multiplexer: BackgroundMultiplexer, rows: dict[str, Any], mute_server: int
) -> None:
    add_instance(impatient_multiplexer, rows, "mute", mute_server)
    embed = mux.EmbedRequest(target=target("mute"), request=tei_pb2.EmbedRequest(inputs="a"))
    rerank = mux.RerankStreamRequest(
        target=target("mute"), request=tei_pb2.RerankStreamRequest(query="q", text="a")
    )
    port = impatient_multiplexer.server.port  # type: ignore[union-attr]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        for call in (
            lambda: stub.EmbedStream(iter([embed, embed]), timeout=20),
            lambda: stub.RerankStream(iter([rerank, rerank]), timeout=20),
        ):
            started = time.monotonic()
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "instance 'mute' sent no answer for 0.5 s" in (error.details() or "")
            assert 0.4 < time.monotonic() - started < 5


def test_a_stream_may_pause_longer_than_the_request_timeout(rows: dict[str, Any]) -> None:
    """The timeout bounds an instance's silence while it owes an answer, not a client's pause."""

    def slow_client() -> Iterator[mux.EmbedRequest]:
        for text in ("before the pause", "after the pause"):
            yield mux.EmbedRequest(
                target=target("minilm"), request=tei_pb2.EmbedRequest(inputs=text)
            )
            time.sleep(2.5)  # the answer comes meanwhile; then nothing is owed

    options = ServerOptions(host="127.0.0.1", port=0, request_timeout_secs=1.5)
    with BackgroundMultiplexer(options) as background:
        wait_for_table(background, {n: "running" for n in rows})
        port = background.server.port  # type: ignore[union-attr]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            answers = list(stub.EmbedStream(slow_client(), timeout=30))
    assert [len(a.embeddings) for a in answers] == [384, 384]


# Arrow ----------------------------------------------------------------------------------

TEXTS = [f"sentence {i}: " + " ".join(["word"] * (i % 7)) for i in range(40)]


def arrow_table(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_all()


def ipc(table: pa.Table, compression: str | None) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(
        sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)
    ) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize(
    ("kind", "compression", "normalize"),
    [(pa.string(), "lz4", True), (pa.large_string(), None, False)],
)
def test_it_embeds_an_arrow_batch_like_embed_does_row_by_row(
    stub: Any,
    servers: dict[str, LocalTEI],
    kind: pa.DataType,
    compression: str | None,
    normalize: bool,
) -> None:
    payload = ipc(
        pa.table({"id": list(range(len(TEXTS))), "text": pa.array(TEXTS, kind)}), compression
    )
    reply = stub.EmbedArrow(
        mux.EmbedArrowRequest(target=target("minilm"), arrow_ipc=payload, normalize=normalize)
    )
    table = arrow_table(reply.arrow_ipc)
    assert table.schema.field("embeddings").type == pa.list_(pa.float32(), 384)
    got = np.array(table.column("embeddings").to_pylist(), dtype=np.float32)
    want = np.array(
        [
            direct(
                servers["minilm"], "Embed", tei_pb2.EmbedRequest(inputs=t, normalize=normalize)
            ).embeddings
            for t in TEXTS
        ],
        dtype=np.float32,
    )
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_it_embeds_an_arrow_batch_sparsely_like_embed_sparse(
    stub: Any, servers: dict[str, LocalTEI]
) -> None:
    texts = TEXTS[:12]
    reply = stub.EmbedSparseArrow(
        mux.EmbedSparseArrowRequest(target=target("splade"), arrow_ipc=text_batch(texts))
    )
    table = arrow_table(reply.arrow_ipc)
    item = pa.struct([("index", pa.uint32()), ("value", pa.float32())])
    assert table.schema.field("sparse_embeddings").type == pa.list_(item)
    for text, row in zip(texts, table.column("sparse_embeddings").to_pylist(), strict=True):
        want = direct(servers["splade"], "EmbedSparse", tei_pb2.EmbedSparseRequest(inputs=text))
        assert [v["index"] for v in row] == [v.index for v in want.sparse_embeddings]
        np.testing.assert_allclose(
            [v["value"] for v in row],
            [v.value for v in want.sparse_embeddings],
            rtol=1e-4,
            atol=1e-5,
        )


def test_it_answers_noop_without_calling_the_instance(
    stub: Any, multiplexer: BackgroundMultiplexer, rows: dict[str, Any]
) -> None:
    add_instance(multiplexer, rows, "nobody-home", free_port())
    reply = stub.EmbedArrow(
        mux.EmbedArrowRequest(target=target("nobody-home"), arrow_ipc=text_batch(TEXTS), noop=True)
    )
    assert arrow_table(reply.arrow_ipc).num_rows == len(TEXTS)
    sparse = stub.EmbedSparseArrow(
        mux.EmbedSparseArrowRequest(
            target=target("nobody-home"), arrow_ipc=text_batch(TEXTS[:3]), noop=True
        )
    )
    assert arrow_table(sparse.arrow_ipc).num_rows == 3


def test_it_refuses_bad_arrow_input_with_a_message(stub: Any) -> None:
    cases = [
        (b"not arrow at all", "not a readable Arrow IPC stream"),
        (ipc(pa.table({"body": ["x"]}), "lz4"), "no 'text' column"),
        (ipc(pa.table({"text": [1, 2]}), None), "must be utf8 or large_utf8"),
        (ipc(pa.table({"text": pa.array([], pa.string())}), None), "no rows"),
    ]
    for payload, message in cases:
        for call, kind in (
            (stub.EmbedArrow, mux.EmbedArrowRequest),
            (stub.EmbedSparseArrow, mux.EmbedSparseArrowRequest),
        ):
            error = rpc_error(
                lambda c=call, k=kind, p=payload: c(  # type: ignore[misc]
                    k(target=target("minilm"), arrow_ipc=p)
                )
            )
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in error.details()


def test_it_refuses_arrow_messages_over_the_size_limit(
    small_multiplexer: BackgroundMultiplexer, rows: dict[str, Any]
) -> None:
    wait_for_table(small_multiplexer, {n: "running" for n in rows})
    port = small_multiplexer.server.port  # type: ignore[union-attr]
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        big = ipc(pa.table({"text": [os.urandom(600).hex() for _ in range(1000)]}), None)
        error = rpc_error(
            lambda: stub.EmbedArrow(mux.EmbedArrowRequest(target=target("minilm"), arrow_ipc=big))
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # 700 rows of 384 floats do not fit in 1 MiB either: the reply is refused, clearly.
        texts = [f"w{i}" for i in range(700)]
        error = rpc_error(
            lambda: stub.EmbedArrow(
                mux.EmbedArrowRequest(target=target("minilm"), arrow_ipc=text_batch(texts))
            )
        )
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "grpc_max_message_size_mb" in error.details()


# Load, tooling, metrics -----------------------------------------------------------------


def test_it_serves_sixteen_concurrent_clients_without_errors(stub: Any) -> None:
    def client(i: int) -> int:
        done = 0
        for j in range(6):
            inner = tei_pb2.EmbedRequest(inputs=f"client {i} call {j}")
            assert (
                len(
                    stub.Embed(
                        mux.EmbedRequest(target=target("minilm"), request=inner), timeout=60
                    ).embeddings
                )
                == 384
            )
            done += 1
        streamed = stub.EmbedStream(
            iter(
                mux.EmbedRequest(
                    target=mux.Target(model_id=MINILM_ID),
                    request=tei_pb2.EmbedRequest(inputs=f"s{i}.{k}"),
                )
                for k in range(4)
            ),
            timeout=60,
        )
        return done + len(list(streamed))

    with ThreadPoolExecutor(16) as pool:
        assert list(pool.map(client, range(16))) == [10] * 16


def test_it_answers_health_and_reflection(multiplexer: BackgroundMultiplexer) -> None:
    port = multiplexer.server.port  # type: ignore[union-attr]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tei_multiplexer.v1.TeiMultiplexer"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        asks = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="tei_multiplexer.v1.TeiMultiplexer"
            ),
        ]
        listed, described = list(reflection.ServerReflectionInfo(iter(asks)))
        names = {s.name for s in listed.list_services_response.service}
        assert {"tei_multiplexer.v1.TeiMultiplexer", "grpc.health.v1.Health"} <= names
        files = described.file_descriptor_response.file_descriptor_proto
        assert any(b"EmbedSparseArrow" in proto for proto in files)


def test_it_counts_requests_errors_and_latency_per_instance_and_method(stub: Any) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    labels = {"instance": "minilm", "method": "Embed"}
    requests = sample("tei_manager_multiplexer_requests_total", **labels)
    errors = sample("tei_manager_multiplexer_errors_total", code="INVALID_ARGUMENT", **labels)
    timed = sample("tei_manager_multiplexer_request_duration_seconds_count", **labels)
    stub.Embed(mux.EmbedRequest(target=target("minilm"), request=tei_pb2.EmbedRequest(inputs="a")))
    rpc_error(
        lambda: stub.Embed(
            mux.EmbedRequest(target=target("minilm"), request=tei_pb2.EmbedRequest(inputs=""))
        )
    )
    assert sample("tei_manager_multiplexer_requests_total", **labels) == requests + 2
    assert (
        sample("tei_manager_multiplexer_errors_total", code="INVALID_ARGUMENT", **labels)
        == errors + 1
    )
    assert sample("tei_manager_multiplexer_request_duration_seconds_count", **labels) == timed + 2


# The command ----------------------------------------------------------------------------


def start_command(*args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "manage.py", "runmultiplexer", *args],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(process: subprocess.Popen[str], marker: str, timeout: float = 30) -> str:
    assert process.stdout is not None
    seen = []
    found = threading.Event()

    def reader() -> None:
        for line in process.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if marker in line:
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    assert found.wait(timeout), "".join(seen)
    return "".join(seen)


def test_it_runs_as_a_command_and_finishes_in_flight_calls_on_sigterm(
    rows: dict[str, Any],
) -> None:
    port = free_port()
    process = start_command(
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--grace", "20"
    )
    try:
        started = read_until(process, "is now running")
        assert "(plaintext, uvloop)" in started
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            stub.Info(mux.InfoRequest(target=target("minilm")), wait_for_ready=True, timeout=10)
            answered: list[Any] = []
            in_flight = threading.Event()

            def requests() -> Iterator[mux.EmbedRequest]:
                for i in range(40):
                    yield mux.EmbedRequest(
                        target=target("minilm"),
                        request=tei_pb2.EmbedRequest(inputs=" ".join(["long"] * 200) + str(i)),
                    )

            def consume() -> None:
                for reply in stub.EmbedStream(requests(), timeout=60):
                    answered.append(reply)
                    in_flight.set()  # the stream is under way: a handler holds it

            streamer = threading.Thread(target=consume)
            streamer.start()
            assert in_flight.wait(20)
            process.send_signal(signal.SIGTERM)
            streamer.join(60)
            assert len(answered) == 40
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        assert "finishing in-flight calls" in output and output.rstrip().endswith("Done.")
    finally:
        if process.poll() is None:
            process.kill()


def test_it_runs_on_asyncio_s_own_loop_when_asked(rows: dict[str, Any]) -> None:
    port = free_port()
    process = start_command(
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0", "--loop", "asyncio"
    )
    try:
        assert "(plaintext, asyncio)" in read_until(process, "is now running")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            reply = stub.Embed(
                mux.EmbedRequest(target=target("minilm"), request=tei_pb2.EmbedRequest(inputs="a")),
                wait_for_ready=True,
                timeout=10,
            )
            assert len(reply.embeddings) == 384
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        assert process.returncode == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_the_event_loop_is_uvloop_unless_asked_otherwise() -> None:
    import asyncio

    import uvloop

    assert event_loop_factory() is uvloop.new_event_loop
    assert event_loop_factory("uvloop") is uvloop.new_event_loop
    assert event_loop_factory("asyncio") is asyncio.new_event_loop
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        event_loop_factory("trio")


def test_its_metrics_reach_the_control_plane_scrape(
    rows: dict[str, Any], tmp_path: Any, settings: Any
) -> None:
    """With PROMETHEUS_MULTIPROC_DIR (as `make run` sets it) the control plane's /metrics
    carries the multiplexer's series."""
    from instances.metrics import render

    port = free_port()
    process = start_command(
        "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )  # fmt: skip
    try:
        read_until(process, "is now running")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            request = mux.EmbedRequest(
                target=target("minilm"), request=tei_pb2.EmbedRequest(inputs="a")
            )
            for _ in range(3):
                stub.Embed(request, wait_for_ready=True, timeout=10)
            rpc_error(lambda: stub.Embed(mux.EmbedRequest(target=target("nobody")), timeout=10))
        settings.TEI = dataclasses.replace(settings.TEI, prometheus_multiproc_dir=str(tmp_path))
        scrape = render()[0].decode()
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
    assert 'tei_manager_multiplexer_requests_total{instance="minilm",method="Embed"} 3.0' in scrape
    assert (
        'tei_manager_multiplexer_errors_total{code="NOT_FOUND",instance="-",method="Embed"} 1.0'
        in scrape
    )
    duration = "tei_manager_multiplexer_request_duration_seconds"
    assert f'{duration}_count{{instance="minilm",method="Embed"}} 3.0' in scrape
    assert "tei_manager_instances_count" in scrape  # the control plane's own series too


def test_it_idles_when_grpc_is_disabled() -> None:
    port = free_port()
    process = start_command("--port", str(port), TEI_MANAGER_GRPC_ENABLED="false")
    try:
        read_until(process, "disabled")
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0 and "Done." in output
    finally:
        if process.poll() is None:
            process.kill()


def run_benchclient(*args: str) -> tuple[dict[str, Any], str]:
    """`manage.py benchclient ARGS` as a user runs it: its JSON report and its stderr."""
    import json

    result = subprocess.run(
        [sys.executable, "manage.py", "benchclient", *args],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_it_has_a_benchmark_client_that_prints_json(
    multiplexer: BackgroundMultiplexer, stub: Any
) -> None:
    port = multiplexer.server.port  # type: ignore[union-attr]
    for mode, batch in (("standard", "4"), ("arrow", "8")):
        report, stderr = run_benchclient(
            "-e", f"http://127.0.0.1:{port}", "-i", "minilm", "--mode", mode,
            "--num-texts", "20", "--batch-size", batch,
        )  # fmt: skip
        assert report["mode"] == mode and report["instance_name"] == "minilm"
        assert (report["successful"], report["failed"], report["num_texts"]) == (20, 0, 20)
        assert report["num_requests"] == (20 if mode == "standard" else 3)
        assert report["throughput_per_sec"] > 0
        assert "text" in stderr  # the progress bar
