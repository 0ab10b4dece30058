"""The routing core without a socket: the wire scan, the table, replica choice, the refresher."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2

from multiplexer.refresher import RoutingRefresher, dial_address, load_routing_table
from multiplexer.routing import Route, Router, RoutingError, RoutingTable
from multiplexer.wire import Target, WireError, split_wrapper

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def wrapper(**target: object) -> multiplexer_pb2.EmbedRequest:
    return multiplexer_pb2.EmbedRequest(
        target=multiplexer_pb2.Target(**target),
        request=tei_pb2.EmbedRequest(inputs="hello", normalize=False, dimensions=8),
    )


def test_it_splits_target_and_inner_bytes_without_parsing_the_inner_request() -> None:
    message = wrapper(instance_name="minilm")
    target, inner = split_wrapper(message.SerializeToString())
    assert target == Target(instance_name="minilm")
    assert inner == message.request.SerializeToString()


def test_it_reads_each_kind_of_target() -> None:
    assert split_wrapper(wrapper(model_id=MINILM).SerializeToString())[0] == Target(model_id=MINILM)
    assert split_wrapper(wrapper(instance_index=7).SerializeToString())[0] == Target(
        instance_index=7
    )
    assert split_wrapper(wrapper(instance_index=0).SerializeToString())[0] == Target(
        instance_index=0
    )
    no_target = multiplexer_pb2.EmbedRequest(request=tei_pb2.EmbedRequest(inputs="x"))
    assert not split_wrapper(no_target.SerializeToString())[0].is_set


def test_it_merges_repeated_fields_like_protobuf_does() -> None:
    first = wrapper(instance_name="a").SerializeToString()
    second = multiplexer_pb2.EmbedRequest(
        target=multiplexer_pb2.Target(model_id="m"), request=tei_pb2.EmbedRequest(truncate=True)
    ).SerializeToString()
    target, inner = split_wrapper(first + second)
    merged = multiplexer_pb2.EmbedRequest.FromString(first + second)
    assert target == Target(model_id="m")
    assert tei_pb2.EmbedRequest.FromString(inner) == merged.request


def test_it_skips_unknown_fields() -> None:
    message = wrapper(instance_name="a").SerializeToString()
    unknown = b"\x18\x96\x01" + b"\x25\x00\x00\x80\x3f" + b"\x29" + b"\x00" * 8
    assert split_wrapper(unknown + message)[0] == Target(instance_name="a")


@pytest.mark.parametrize(
    "garbage",
    [b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a\x03\x0a\x01\xff", b"\x0b", b"\x00\x01", b"\x12"],
)
def test_it_rejects_malformed_wrappers(garbage: bytes) -> None:
    with pytest.raises(WireError):
        split_wrapper(garbage)


def routes() -> RoutingTable:
    return RoutingTable.build(
        [
            Route("b-replica", MINILM, "127.0.0.1:2", "running"),
            Route("a-replica", MINILM, "127.0.0.1:1", "running"),
            Route("stopped", "other/model", "127.0.0.1:3", "stopped"),
            Route("starting", MINILM, "127.0.0.1:4", "starting"),
        ]
    )


def status_of(table: RoutingTable, target: Target) -> grpc.StatusCode:
    with pytest.raises(RoutingError) as caught:
        table.candidates(target)
    return caught.value.code


def test_it_routes_by_name_model_and_index() -> None:
    table = routes()
    assert [r.name for r in table.candidates(Target(instance_name="b-replica"))] == ["b-replica"]
    assert [r.name for r in table.candidates(Target(model_id=MINILM))] == [
        "a-replica",
        "b-replica",
    ]
    assert table.candidates(Target(instance_index=0))[0].name == "a-replica"
    assert table.candidates(Target(instance_index=1))[0].name == "b-replica"


def test_it_maps_each_routing_failure_to_its_status_code() -> None:
    table = routes()
    assert status_of(table, Target()) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(table, Target(instance_name="")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(table, Target(instance_name="nope")) == grpc.StatusCode.NOT_FOUND
    assert status_of(table, Target(instance_name="stopped")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(table, Target(instance_name="starting")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(table, Target(model_id="unknown/model")) == grpc.StatusCode.NOT_FOUND
    assert status_of(table, Target(model_id="other/model")) == grpc.StatusCode.UNAVAILABLE
    assert status_of(table, Target(instance_index=2)) == grpc.StatusCode.NOT_FOUND


def test_it_sends_the_next_call_to_the_replica_with_fewest_in_flight() -> None:
    async def scenario() -> None:
        router = Router(routes())
        first = await router.acquire(Target(model_id=MINILM), None)
        second = await router.acquire(Target(model_id=MINILM), None)
        assert {first.name, second.name} == {"a-replica", "b-replica"}
        router.release(first)
        assert (await router.acquire(Target(model_id=MINILM), None)).name == first.name
        assert (router.in_flight(first.name), router.in_flight(second.name)) == (1, 1)

    asyncio.run(scenario())


def test_it_takes_turns_among_idle_replicas() -> None:
    async def scenario() -> None:
        router = Router(routes())
        names = []
        for _ in range(6):
            route = await router.acquire(Target(model_id=MINILM), None)
            names.append(route.name)
            router.release(route)
        assert names.count("a-replica") == 3 and names.count("b-replica") == 3
        assert router.in_flight("a-replica") == router.in_flight("b-replica") == 0

    asyncio.run(scenario())


def test_it_dials_a_usable_address() -> None:
    assert dial_address("10.0.0.5", 8080) == "10.0.0.5:8080"
    assert dial_address("0.0.0.0", 8080) == "127.0.0.1:8080"
    assert dial_address("::1", 8080) == "[::1]:8080"


@pytest.mark.django_db(transaction=True)
def test_it_loads_the_table_from_the_instance_rows_and_beats() -> None:
    from instances.models import Heartbeat, Instance

    Instance.objects.create(name="one", model_id=MINILM, port=18001, prometheus_port=19001)
    Instance.objects.create(
        name="two", model_id=MINILM, port=18002, prometheus_port=19002, status="running"
    )
    table = load_routing_table()
    assert table.by_name["one"].status == "pending"
    assert [r.name for r in table.running] == ["two"]
    assert table.by_name["two"].address == "127.0.0.1:18002"

    router = Router()
    changes: list[RoutingTable] = []
    refresher = RoutingRefresher(router, on_change=changes.append)
    before = time.monotonic()
    assert refresher.refresh_once() is True
    first = refresher.last_read_began
    assert first >= before
    assert refresher.refresh_once() is False
    assert refresher.last_read_began > first  # an unchanged table is as fresh as the read
    assert len(changes) == 1 and router.table == table
    assert Heartbeat.objects.get(name="multiplexer").last_seen is not None


def test_the_grpc_write_fix_is_installed_once_a_channel_pool_exists() -> None:
    from grpc.aio import _call

    from multiplexer import grpc_fixes
    from multiplexer.channels import ChannelPool

    ChannelPool()
    assert _call._StreamRequestMixin._write is grpc_fixes._write
    assert grpc_fixes.keep_status_on_failed_writes() is True  # idempotent
