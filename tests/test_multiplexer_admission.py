"""Admission: at most max_concurrent_requests calls in flight per instance, the rest queued
in a bounded FIFO, refused past it (RESOURCE_EXHAUSTED / HTTP 429), for gRPC and HTTP alike.

The gate itself is tested without a socket; then a localtei that refuses anything past 2
calls in flight, and a stand-in instance that holds every call until told to answer (so
that queue states are exact, not timing-dependent), behind a real multiplexer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.admission import Overloaded
from multiplexer.routing import Route, Router, RoutingError, RoutingTable
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from multiplexer.wire import Target
from tests.http_client import HoldingInstance, add_row, request
from tests.localtei_fixtures import MINILM_ID, LocalTEI, start_localtei
from tests.test_multiplexer import rpc_error, wait_for_read

# The gate, without a socket --------------------------------------------------------------


def table(limit: int = 2, status: str = "running") -> RoutingTable:
    return RoutingTable.build([Route("one", "m", "127.0.0.1:1", status, limit)])


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_it_admits_up_to_the_limit_and_queues_the_rest_in_arrival_order() -> None:
    async def scenario() -> None:
        router = Router(table(limit=2), queue_size=10)
        target = Target(instance_name="one")
        admitted: list[int] = []

        async def call(number: int) -> None:
            await router.acquire(target, 10)
            admitted.append(number)
            await asyncio.sleep(0)

        tasks = [asyncio.create_task(call(n)) for n in range(5)]
        await asyncio.sleep(0.01)
        gate = router.gates["one"]
        assert (admitted, gate.in_flight, len(gate.waiters)) == ([0, 1], 2, 3)
        assert sample("tei_manager_multiplexer_queue_depth", instance="one") == 3
        for expected in ([0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4]):
            router.release(router.table.by_name["one"])
            await asyncio.sleep(0.01)
            assert admitted == expected
        await asyncio.gather(*tasks)
        assert (gate.in_flight, len(gate.waiters)) == (2, 0)  # 2 still held by calls 3 and 4

    asyncio.run(scenario())


def test_it_refuses_a_call_when_the_queue_is_full() -> None:
    async def scenario() -> None:
        router = Router(table(limit=1), queue_size=2)
        target = Target(instance_name="one")
        refused = sample("tei_manager_multiplexer_queue_refused_total", instance="one",
                         reason="queue_full")  # fmt: skip
        await router.acquire(target, 10)
        waiting = [asyncio.create_task(router.acquire(target, 10)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as caught:
            await router.acquire(target, 10)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "1 calls in flight" in caught.value.message and "2 queued" in caught.value.message
        assert sample("tei_manager_multiplexer_queue_refused_total", instance="one",
                      reason="queue_full") == refused + 1  # fmt: skip
        for task in waiting:
            task.cancel()

    asyncio.run(scenario())


def test_a_queued_call_waits_no_longer_than_its_deadline_and_leaves_the_queue() -> None:
    async def scenario() -> None:
        router = Router(table(limit=1), queue_size=5)
        target = Target(instance_name="one")
        await router.acquire(target, 10)
        waited = sample("tei_manager_multiplexer_queue_wait_seconds_count", instance="one")
        with pytest.raises(Overloaded, match="waited 0.05 s in its queue"):
            await router.acquire(target, 0.05)
        assert len(router.gates["one"].waiters) == 0
        # The slot, once free, goes to the next caller at once.
        router.release(router.table.by_name["one"])
        await router.acquire(target, 0)
        assert router.in_flight("one") == 1
        assert sample("tei_manager_multiplexer_queue_wait_seconds_count", instance="one") == waited

    asyncio.run(scenario())


def test_a_cancelled_waiter_leaves_the_queue_and_never_takes_a_slot() -> None:
    async def scenario() -> None:
        router = Router(table(limit=1), queue_size=5)
        target = Target(instance_name="one")
        await router.acquire(target, 10)
        first = asyncio.create_task(router.acquire(target, 10))
        second = asyncio.create_task(router.acquire(target, 10))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        assert len(router.gates["one"].waiters) == 1
        router.release(router.table.by_name["one"])
        await second
        assert router.in_flight("one") == 1

    asyncio.run(scenario())


def test_a_new_table_raises_the_limit_or_fails_the_queue_of_an_instance_that_stopped() -> None:
    async def scenario() -> None:
        router = Router(table(limit=1), queue_size=5)
        target = Target(instance_name="one")
        await router.acquire(target, 10)
        waiting = asyncio.create_task(router.acquire(target, 10))
        await asyncio.sleep(0.01)
        router.update(table(limit=2))
        router.retain(router.table)
        await asyncio.wait_for(waiting, 1)
        assert router.in_flight("one") == 2

        stranded = asyncio.create_task(router.acquire(target, 10))
        await asyncio.sleep(0.01)
        router.update(table(limit=2, status="stopped"))
        router.retain(router.table)
        with pytest.raises(RoutingError) as caught:
            await stranded
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        assert "one' is stopped" in caught.value.message

    asyncio.run(scenario())


# Through the multiplexer, with real instances --------------------------------------------

with_rows = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def two_at_a_time() -> Iterator[LocalTEI]:
    """minilm refusing (RESOURCE_EXHAUSTED) any unary call past 2 in flight."""
    with start_localtei(MINILM_ID, "--max-concurrent-requests", "2") as server:
        yield server


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    """The default queue: 1024 calls per instance."""
    with BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0, http_port=0)) as background:
        yield background


@pytest.fixture(scope="module")
def short_queue() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, queue_size=4)
    with BackgroundMultiplexer(options) as background:
        yield background


@pytest.fixture
def holding() -> Iterator[HoldingInstance]:
    instance = HoldingInstance()
    yield instance
    instance.release()
    instance.server.stop(0)


def wait_for(predicate: Callable[[], Any], message: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def routable(background: BackgroundMultiplexer, name: str) -> None:
    wait_for_read(
        background, lambda table: name in table.by_name, f"{name} never reached the routing table"
    )


def embed_wrapper(name: str, text: str = "x") -> mux.EmbedRequest:
    return mux.EmbedRequest(target=mux.Target(instance_name=name),
                            request=tei_pb2.EmbedRequest(inputs=text))  # fmt: skip


@with_rows
def test_32_callers_on_an_instance_of_2_all_succeed_through_grpc_and_http(
    multiplexer: BackgroundMultiplexer, two_at_a_time: LocalTEI
) -> None:
    """localtei itself refuses a unary call past its limit: through the multiplexer the
    extra callers wait their turn instead (the queue holds them: 1024 by default)."""
    add_row("pair", MINILM_ID, two_at_a_time.port, max_concurrent_requests=2)
    routable(multiplexer, "pair")
    server = multiplexer.server
    assert server is not None
    barrier = threading.Barrier(32)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)

        def grpc_caller(i: int) -> int:
            barrier.wait()
            return len(stub.Embed(embed_wrapper("pair", f"caller {i}"), timeout=60).embeddings)

        with futures.ThreadPoolExecutor(32) as pool:
            assert list(pool.map(grpc_caller, range(32))) == [384] * 32

    def http_caller(i: int) -> int:
        barrier.wait()
        reply = request(f"http://127.0.0.1:{server.http_port}/instances/pair/embed",
                        {"inputs": [f"caller {i}", "and a second text"]})  # fmt: skip
        assert reply.status == 200, reply.json
        return len(reply.json)

    barrier.reset()
    with futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(http_caller, range(32))) == [2] * 32
    assert server.router.in_flight("pair") == 0


@with_rows
def test_past_the_queue_bound_calls_get_resource_exhausted_and_429(
    short_queue: BackgroundMultiplexer, holding: HoldingInstance
) -> None:
    """Limit 2, queue 4: of 9 callers 2 run, 4 wait, 3 are refused; the waiting ones get
    through once the instance answers."""
    add_row("held", "held/model", holding.port, max_concurrent_requests=2)
    routable(short_queue, "held")
    server = short_queue.server
    assert server is not None
    refused_before = sample("tei_manager_multiplexer_queue_refused_total", instance="held",
                            reason="queue_full")  # fmt: skip
    waited_before = sample("tei_manager_multiplexer_queue_wait_seconds_count", instance="held")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        with futures.ThreadPoolExecutor(8) as pool:
            calls = [pool.submit(stub.Embed, embed_wrapper("held"), timeout=30) for _ in range(6)]
            gate = lambda: server.router.gates.get("held")  # noqa: E731
            wait_for(lambda: gate() is not None and len(gate().waiters) == 4, "4 never queued")
            assert sample("tei_manager_multiplexer_queue_depth", instance="held") == 4
            error = rpc_error(lambda: stub.Embed(embed_wrapper("held"), timeout=30))
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue_size" in error.details()
            reply = request(f"http://127.0.0.1:{server.http_port}/instances/held/embed",
                            {"inputs": "x"})  # fmt: skip
            assert (reply.status, reply.json["error_type"]) == (429, "Overloaded")
            assert reply.headers["retry-after"] == "1"
            openai = request(f"http://127.0.0.1:{server.http_port}/v1/embeddings",
                             {"model": "held", "input": "x"})  # fmt: skip
            assert openai.status == 429 and openai.json["error"]["code"] == "rate_limit_exceeded"
            wait_for(lambda: holding.seen == 2, "the 2 admitted calls never arrived")
            time.sleep(0.2)
            assert holding.seen == 2  # the instance never saw more than its limit
            holding.release()
            assert [len(call.result().embeddings) for call in calls] == [2] * 6
    assert sample("tei_manager_multiplexer_queue_refused_total", instance="held",
                  reason="queue_full") == refused_before + 3  # fmt: skip
    assert sample("tei_manager_multiplexer_queue_wait_seconds_count",
                  instance="held") == waited_before + 4  # fmt: skip
    assert sample("tei_manager_multiplexer_queue_depth", instance="held") == 0
    assert server.router.in_flight("held") == 0


@with_rows
def test_a_stream_holds_one_slot_per_message_in_flight(
    short_queue: BackgroundMultiplexer, holding: HoldingInstance
) -> None:
    add_row("streamed", "streamed/model", holding.port, max_concurrent_requests=2)
    routable(short_queue, "streamed")
    server = short_queue.server
    assert server is not None
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        answers = stub.EmbedStream(iter([embed_wrapper("streamed")] * 5), timeout=30)
        gate = lambda: server.router.gates.get("streamed")  # noqa: E731
        wait_for(lambda: gate() is not None and len(gate().waiters) == 1, "no message queued")
        assert gate().in_flight == 2  # type: ignore[union-attr]
        holding.release()
        assert len(list(answers)) == 5
    assert server.router.in_flight("streamed") == 0


def test_a_lowered_limit_sheds_slots_before_admitting_anyone() -> None:
    async def scenario() -> None:
        router = Router(table(limit=3), queue_size=5)
        target = Target(instance_name="one")
        for _ in range(3):
            await router.acquire(target, 10)
        waiting = asyncio.create_task(router.acquire(target, 10))
        await asyncio.sleep(0.01)
        router.update(table(limit=1))
        router.retain(router.table)
        route = router.table.by_name["one"]
        router.release(route)
        router.release(route)
        await asyncio.sleep(0.01)
        assert not waiting.done() and router.in_flight("one") == 1
        router.release(route)
        await asyncio.wait_for(waiting, 1)
        assert router.in_flight("one") == 1

    asyncio.run(scenario())
