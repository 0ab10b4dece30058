"""Racing requests over real HTTP on the file database: exactly the right creates win,
no 500 and no "database is locked"."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from instances.models import Instance
from tests.conftest import SESSION_ID

pytestmark = pytest.mark.django_db(transaction=True)


def post(url: str, payload: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    data = json.dumps(payload).encode() if payload is not None else b""
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def nowhere(settings: Any) -> None:
    # No worker serves this node: the queued start tasks are dropped at the session's end.
    settings.NODE_NAME = f"nowhere-{SESSION_ID}"


def test_it_lets_exactly_the_right_concurrent_creates_win(live_server: Any, nowhere: None) -> None:
    requests = [{"name": f"n{i // 2}", "model_id": "m"} for i in range(10)]
    requests += [{"name": f"p{i}", "model_id": "m", "port": 45100 + i % 2} for i in range(10)]
    barrier = threading.Barrier(len(requests))

    def create(payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        barrier.wait()
        return post(f"{live_server.url}/instances", payload)

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(create, requests))

    codes = Counter(status for status, _ in results)
    errors = Counter(body.get("code") for status, body in results if status != 201)
    assert codes == {201: 7, 409: 5, 422: 8}, results
    assert errors == {"INSTANCE_EXISTS": 5, "PORT_CONFLICT": 8}
    names = set(Instance.objects.values_list("name", flat=True))
    assert {f"n{i}" for i in range(5)} <= names and len(names) == 7
    ports = [p for pair in Instance.objects.values_list("port", "prometheus_port") for p in pair]
    assert len(ports) == len(set(ports)) == 14
    assert {45100, 45101} <= set(ports)


def test_it_starts_a_stopped_instance_once_under_racing_starts(
    live_server: Any, nowhere: None
) -> None:
    assert post(f"{live_server.url}/instances", {"name": "raced", "model_id": "m"})[0] == 201
    Instance.objects.filter(name="raced").update(status="stopped", desired_state="stopped")
    barrier = threading.Barrier(10)

    def start(_: int) -> tuple[int, dict[str, Any]]:
        barrier.wait()
        return post(f"{live_server.url}/instances/raced/start")

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(start, range(10)))
    assert Counter(status for status, _ in results) == {200: 1, 409: 9}, results
    assert {body["code"] for status, body in results if status == 409} == {"ALREADY_RUNNING"}
    assert Instance.objects.get(name="raced").status == "pending"


def test_a_transition_that_forgets_the_pid_forgets_its_start_time_too() -> None:
    from django.utils import timezone

    from instances.models import Status

    row = Instance.objects.create(
        name="forgetful", model_id="m", port=18500, prometheus_port=19500,
        status=Status.RUNNING, pid=4242, process_started_at=123.5, started_at=timezone.now(),
    )  # fmt: skip
    assert not row.transition([Status.STOPPED], Status.FAILED, pid=None)  # not in that state
    assert Instance.objects.get(pk=row.pk).process_started_at == 123.5
    assert row.transition([Status.RUNNING], Status.FAILED, same_process=True, pid=None)
    stored = Instance.objects.get(pk=row.pk)
    assert (stored.status, stored.pid, stored.process_started_at) == (Status.FAILED, None, None)
    assert row.process_started_at is None
