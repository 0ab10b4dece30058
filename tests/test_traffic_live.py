"""The traffic roll-up in a running multiplexer: real calls to a real localtei, over gRPC and
HTTP, come back as one TrafficSample row per instance per window, with every call, error,
token and queued call counted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.server import BackgroundMultiplexer, ServerOptions
from telemetry import histogram, series
from telemetry.models import TrafficSample
from tests.conftest import wait_until
from tests.http_client import HoldingInstance, add_row, request
from tests.localtei_fixtures import MINILM_ID, LocalTEI, start_localtei
from tests.test_multiplexer import rpc_error, wait_for_read

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def minilm() -> Iterator[LocalTEI]:
    with start_localtei(MINILM_ID) as server:
        yield server


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, rollup_interval_secs=1)
    with BackgroundMultiplexer(options) as background:
        yield background


def routable(background: BackgroundMultiplexer, name: str) -> None:
    wait_for_read(background, lambda table: name in table.by_name, f"{name} routable", 10)


def totals(name: str) -> dict[str, Any]:
    rows = list(TrafficSample.objects.filter(instance=name).values())
    merged = histogram.merge(histogram.from_json(row["latency"]) for row in rows)
    return {
        "rows": len(rows),
        "windows": len({row["at"] for row in rows}),
        "calls": sum(row["calls"] for row in rows),
        "errors": sum(row["errors"] for row in rows),
        "tokens": sum(row["tokens"] for row in rows),
        "timed": sum(merged.values()),
        "queue_depth": max((row["queue_depth"] for row in rows), default=0),
    }


def test_grpc_and_http_calls_are_rolled_up_once_per_window(
    minilm: LocalTEI, multiplexer: BackgroundMultiplexer
) -> None:
    add_row("rolled", MINILM_ID, minilm.port)
    routable(multiplexer, "rolled")
    assert multiplexer.server is not None
    target = mux.Target(instance_name="rolled")
    tokens = 0
    with grpc.insecure_channel(f"127.0.0.1:{multiplexer.server.port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        for index in range(12):
            request_ = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(
                inputs=f"call number {index} " * (index + 1)))  # fmt: skip
            tokens += stub.Embed(request_).metadata.compute_tokens
        stream = [
            mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=f"streamed {i}"))
            for i in range(3)
        ]
        tokens += sum(reply.metadata.compute_tokens for reply in stub.EmbedStream(iter(stream)))
        for _ in range(2):  # localtei refuses an empty input: an error of this instance
            empty = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=""))
            assert (
                rpc_error(lambda e=empty: stub.Embed(e)).code() == grpc.StatusCode.INVALID_ARGUMENT
            )
    base = f"http://127.0.0.1:{multiplexer.server.http_port}/instances/rolled"
    for text in ("one", ["two", "three"], "four"):
        reply = request(f"{base}/embed", {"inputs": text})
        assert reply.status == 200
        tokens += int(reply.headers["x-compute-tokens"])
    assert request(f"{base}/embed", {"inputs": []}).status == 400

    expected_calls = 12 + 1 + 2 + 3 + 1
    wait_until(lambda: totals("rolled")["calls"] == expected_calls, 20, "every call rolled up")
    seen = totals("rolled")
    assert seen["errors"] == 3
    assert seen["tokens"] == tokens > 0
    assert seen["timed"] == expected_calls
    assert seen["rows"] == seen["windows"]  # one row per window, however many calls
    # An idle running instance still gets its row: zeros, not a gap in its chart.
    rows_before = seen["rows"]
    wait_until(lambda: totals("rolled")["rows"] >= rows_before + 2, 10, "idle windows")
    assert totals("rolled")["calls"] == expected_calls
    current = series.current_traffic()
    assert current["rolled"].calls_per_sec == 0.0


def test_the_longest_queue_of_a_window_is_kept(multiplexer: BackgroundMultiplexer) -> None:
    holding = HoldingInstance()
    add_row("queued", "queued/model", holding.port, max_concurrent_requests=1)
    routable(multiplexer, "queued")
    assert multiplexer.server is not None
    address = f"127.0.0.1:{multiplexer.server.port}"
    request_ = mux.EmbedRequest(
        target=mux.Target(instance_name="queued"), request=tei_pb2.EmbedRequest(inputs="x")
    )
    replies: list[Any] = []

    def call() -> None:
        with grpc.insecure_channel(address) as channel:
            replies.append(multiplexer_pb2_grpc.TeiMultiplexerStub(channel).Embed(request_))

    callers = [threading.Thread(target=call) for _ in range(3)]
    try:
        for caller in callers:
            caller.start()
        gates = multiplexer.server.router.gates
        wait_until(lambda: "queued" in gates and len(gates["queued"].waiters) == 2, 20)
        started = time.time()
        wait_until(
            lambda: TrafficSample.objects.filter(
                instance="queued", at__gte=int(started), queue_depth=2, in_flight=1
            ).exists(),
            20,
            "a sample with two queued calls and one in flight",
        )
    finally:
        holding.release()
        for caller in callers:
            caller.join(30)
        holding.server.stop(0)
    assert len(replies) == 3
    wait_until(lambda: totals("queued")["calls"] == 3, 20, "the three calls rolled up")
