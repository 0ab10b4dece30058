"""Instances on demand, end to end: a real Celery worker, real localtei processes, a
real multiplexer. The first calls for an on-demand model start one instance (20 callers
at once share the start), the calls then go through; the instance stops once idle, its
row stays, and the next call (HTTP `model` this time) starts it again. The last-call
times reach the database in batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from access.models import AuditEvent
from instances.models import Instance
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from registry.models import Model
from tests.conftest import Worker, wait_for_status
from tests.http_client import request
from tests.localtei_fixtures import MINILM_ID
from tests.stack import wait_until

CALLERS = 20
IDLE_SECS = 3


@pytest.fixture
def multiplexer(manager_worker: Worker) -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, on_demand_wait_secs=120)
    with BackgroundMultiplexer(options) as background:
        yield background


def cold_starts(model_id: str) -> float:
    return (
        REGISTRY.get_sample_value("tei_manager_on_demand_cold_starts_total", {"model": model_id})
        or 0.0
    )


def embed(stub: Any, model_id: str, text: str, timeout: float = 120) -> Any:
    request_ = mux.EmbedRequest(
        target=mux.Target(model_id=model_id), request=tei_pb2.EmbedRequest(inputs=text)
    )
    return stub.Embed(request_, timeout=timeout)


def test_concurrent_first_calls_share_one_start_idle_stops_and_the_next_call_restarts(
    multiplexer: BackgroundMultiplexer,
) -> None:
    Model.objects.update_or_create(
        model_id=MINILM_ID, defaults={"on_demand": True, "idle_timeout_secs": IDLE_SECS}
    )
    Model.objects.create(model_id="org/not-on-demand")
    assert multiplexer.server is not None
    router = multiplexer.server.router
    wait_until(lambda: MINILM_ID in router.table.on_demand, 5, "the on-demand set")
    channel = grpc.insecure_channel(f"127.0.0.1:{multiplexer.server.port}")
    stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)

    with pytest.raises(grpc.RpcError) as refused:
        embed(stub, "org/not-on-demand", "hello", timeout=5)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND

    before = cold_starts(MINILM_ID)
    barrier = threading.Barrier(CALLERS)

    def first_call(index: int) -> int:
        barrier.wait()
        return len(embed(stub, MINILM_ID, f"cold call {index}").embeddings)

    with ThreadPoolExecutor(CALLERS) as pool:
        dimensions = list(pool.map(first_call, range(CALLERS)))
    assert dimensions == [384] * CALLERS
    [instance] = Instance.objects.filter(model_id=MINILM_ID)
    assert instance.on_demand and instance.status == "running"
    assert instance.idle_timeout_secs == IDLE_SECS  # the model's
    assert cold_starts(MINILM_ID) == before + 1
    creates = AuditEvent.objects.filter(subject_kind="instance", action="create")
    assert [(e.subject, e.actor, e.result) for e in creates] == [(instance.name, "on-demand", "ok")]

    # The calls' time reaches the row in a batch; then, without calls, the instance stops.
    wait_until(
        lambda: Instance.objects.filter(pk=instance.pk, last_call_at__isnull=False).exists(),
        10,
        "the last call written",
    )
    stopped = wait_for_status(instance.name, "stopped", timeout=30)
    assert stopped.desired_state == "stopped" and stopped.pid is None
    wait_until(lambda: MINILM_ID not in router.table.running_models, 5, "the table to see it")

    # The next call, over HTTP by `model`, starts the same row again.
    started = time.monotonic()
    base = f"http://127.0.0.1:{multiplexer.server.http_port}"
    reply = request(f"{base}/v1/embeddings", {"model": MINILM_ID, "input": "warm again"})
    assert reply.status == 200, reply.body
    assert len(reply.json["data"][0]["embedding"]) == 384
    assert time.monotonic() - started < 120
    [again] = Instance.objects.filter(model_id=MINILM_ID)
    assert (again.name, again.status) == (instance.name, "running")
    assert cold_starts(MINILM_ID) == before + 2
    channel.close()


def test_only_an_on_demand_model_with_nothing_running_needs_a_start_and_only_for_its_keys() -> None:
    import re

    from multiplexer.keys import KeyEntry
    from multiplexer.routing import Route, Router, RoutingTable
    from multiplexer.wire import Target

    routes = [
        Route("warm", "org/warm", "127.0.0.1:1", "running"),
        Route("parked", "org/parked", "127.0.0.1:2", "stopped"),
    ]
    table = RoutingTable.build(routes, on_demand=["org/warm", "org/parked", "org/new"])
    router = Router(table)
    assert not router.needs_start(Target(model_id="org/new"))  # no cold starter: never
    router.cold = object()  # type: ignore[assignment]
    assert router.needs_start(Target(model_id="org/new"))
    assert router.needs_start(Target(model_id="org/parked"))
    assert not router.needs_start(Target(model_id="org/warm"))
    assert not router.needs_start(Target(model_id="org/other"))
    assert not router.needs_start(Target(instance_name="parked"))

    def key(pattern: str | None) -> KeyEntry:
        targets = None if pattern is None else re.compile(pattern)
        return KeyEntry("1", "k", "p", "h", True, targets, None, 1.0, None, False)

    assert router.needs_start(Target(model_id="org/new"), key(None))
    assert router.needs_start(Target(model_id="org/new"), key(r"org/new"))
    assert not router.needs_start(Target(model_id="org/new"), key(r"org/other"))


@pytest.mark.django_db
def test_on_demand_default_makes_every_registered_model_on_demand(settings: Any) -> None:
    import dataclasses

    from multiplexer.refresher import load_routing_table

    Model.objects.create(model_id="org/flagged", on_demand=True)
    Model.objects.create(model_id="org/plain")
    assert load_routing_table().on_demand == {"org/flagged"}
    settings.TEI = dataclasses.replace(settings.TEI, on_demand_default=True)
    assert load_routing_table().on_demand == {"org/flagged", "org/plain"}


@pytest.mark.django_db
def test_the_tick_stops_only_instances_idle_past_their_timeout() -> None:
    from datetime import timedelta

    from django.utils import timezone

    from instances import supervisor

    now = timezone.now()
    long_ago, just_now = now - timedelta(seconds=120), now - timedelta(seconds=5)
    rows = {
        name: Instance.objects.create(
            name=name, model_id="org/m", port=port, prometheus_port=port + 1, status="running",
            idle_timeout_secs=timeout, last_call_at=last_call, started_at=long_ago,
        )
        for name, port, timeout, last_call in (
            ("idle", 31000, 60, long_ago),
            ("busy", 31002, 60, just_now),
            ("never-called", 31004, 60, None),
            ("no-timeout", 31006, None, long_ago),
        )
    }  # fmt: skip
    work = supervisor.stop_idle(list(rows.values()), now)
    assert sorted(w.pk for w in work) == sorted([rows["idle"].pk, rows["never-called"].pk])
    states = dict(Instance.objects.values_list("name", "status"))
    assert states == {
        "idle": "stopping", "busy": "running", "never-called": "stopping", "no-timeout": "running"
    }  # fmt: skip
    assert Instance.objects.get(name="idle").desired_state == "stopped"


@pytest.mark.django_db
def test_last_call_times_are_written_in_one_update_per_instance_called() -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from multiplexer.refresher import RoutingRefresher
    from multiplexer.routing import Router

    for name, port in (("a", 31010), ("b", 31012)):
        Instance.objects.create(name=name, model_id="org/m", port=port, prometheus_port=port + 1)
    router = Router()
    refresher = RoutingRefresher(router)
    router.last_calls.update(a=1_800_000_000.0, b=1_800_000_001.0)
    with CaptureQueriesContext(connection) as queries:
        assert refresher.write_last_calls() == 2
    assert len(queries) == 2
    assert Instance.objects.get(name="b").last_call_at.timestamp() == 1_800_000_001.0
    router.last_calls["a"] = 1_800_000_005.0  # only a was called since
    assert refresher.write_last_calls() == 1
    assert refresher.write_last_calls() == 0
