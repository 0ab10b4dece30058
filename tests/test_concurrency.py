"""Racing requests over real HTTP on the file database: exactly the right creates win,
no 500 and no "database is locked"."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest

from instances.models import Instance
from tests.conftest import SESSION_ID
from tests.stack import free_ports, instance_processes, listener

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.postgres]


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
    asked = free_ports(2)  # two ports nothing on the host holds: only the race decides
    requests += [{"name": f"p{i}", "model_id": "m", "port": asked[i % 2]} for i in range(10)]
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
    assert set(asked) <= set(ports)


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


def test_racing_restarts_leave_exactly_one_tracked_process(
    live_server: Any, manager_worker: Any
) -> None:
    from instances import services
    from instances.models import Status
    from tests.conftest import wait_for_status, wait_until

    services.create_instance(name="restarted", model_id="sentence-transformers/all-MiniLM-L6-v2")
    port = wait_for_status("restarted", Status.RUNNING).port

    def restart(barrier: threading.Barrier) -> int:
        barrier.wait()
        return post(f"{live_server.url}/instances/restarted/restart")[0]

    for _ in range(3):
        barrier = threading.Barrier(4)
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(restart, [barrier] * 4)) == [200] * 4
        time.sleep(0.3)

    def settled() -> Instance | None:
        row = Instance.objects.get(name="restarted")
        live = instance_processes(port)
        if row.status == Status.RUNNING and live == {row.pid}:
            return row
        assert row.status != Status.FAILED, row.last_error
        return None

    row = wait_until(settled, 120, "one running process, the tracked one")
    assert listener(port) == row.pid
    # It stays that way: no second process fighting for the port, no crash loop.
    ticks = Instance.objects.get(name="restarted").last_health_check
    wait_until(
        lambda: Instance.objects.get(name="restarted").last_health_check > ticks, 10, "a tick"
    )
    time.sleep(2)
    final = Instance.objects.get(name="restarted")
    assert (final.status, final.pid) == (Status.RUNNING, row.pid)
    assert instance_processes(port) == {row.pid} and listener(port) == row.pid


def test_a_restart_counts_only_a_process_that_ran(nowhere: None, settings: Any) -> None:
    from instances import services
    from instances.models import Status

    rows = {
        "fresh": {"status": Status.PENDING},  # just created: never ran
        "spawning": {"status": Status.STARTING},  # claimed, no process yet
        "loading": {"status": Status.STARTING, "pid": 4242},
        "serving": {"status": Status.RUNNING, "pid": 4243},
        "parked": {"status": Status.STOPPED},
    }
    for offset, (name, fields) in enumerate(rows.items()):
        Instance.objects.create(
            name=name, model_id="m", port=45200 + offset, prometheus_port=45300 + offset,
            node=settings.NODE_NAME, **fields,
        )  # fmt: skip
    for name in rows:
        services.restart_instance(name)
    counted = dict(Instance.objects.values_list("name", "restarts"))
    assert counted == {"fresh": 0, "spawning": 0, "loading": 1, "serving": 1, "parked": 0}
    assert set(Instance.objects.values_list("status", flat=True)) == {Status.PENDING}


def test_a_delete_records_the_pid_a_launch_saved_just_before(
    nowhere: None, settings: Any, monkeypatch: Any
) -> None:
    from instances import process, services, supervisor
    from instances.models import OrphanProcess, Status

    Instance.objects.create(
        name="doomed", model_id="m", port=45400, prometheus_port=45401,
        node=settings.NODE_NAME, status=Status.STARTING,
    )  # fmt: skip
    read_before_the_save = Instance.objects.get(name="doomed")
    sleeper = subprocess.Popen(["sleep", "600"], start_new_session=True)
    started = psutil.Process(sleeper.pid).create_time()
    Instance.objects.filter(name="doomed").update(pid=sleeper.pid, process_started_at=started)
    # The delete looked the row up before that save landed.
    monkeypatch.setattr(services, "get_instance", lambda name: read_before_the_save)
    try:
        services.delete_instance("doomed")
        [orphan] = OrphanProcess.objects.all()
        assert (orphan.pid, orphan.process_started_at) == (sleeper.pid, started)
        supervisor.kill_orphan(orphan.pk)
        assert not OrphanProcess.objects.exists() and not process.is_alive(sleeper.pid, started)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_launch_whose_row_was_deleted_meanwhile_kills_its_process(
    nowhere: None, settings: Any, monkeypatch: Any
) -> None:
    import dataclasses

    from instances import process, services, supervisor
    from instances.models import OrphanProcess
    from tests.conftest import FAKE_TEI

    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(FAKE_TEI))
    row = Instance.objects.create(
        name="vanishing", model_id="fake/m", port=45500, prometheus_port=45501,
        node=settings.NODE_NAME,
    )  # fmt: skip
    spawn, spawned = process.spawn, []

    def spawn_then_delete(*args: Any, **kwargs: Any) -> process.Spawned:
        spawned.append(spawn(*args, **kwargs))
        services.delete_instance("vanishing")  # the row had no pid yet: no orphan recorded
        return spawned[0]

    monkeypatch.setattr(process, "spawn", spawn_then_delete)
    supervisor.launch(row.pk)
    process.reap_children()
    assert not process.is_alive(spawned[0].pid, spawned[0].create_time)
    assert not Instance.objects.exists() and not OrphanProcess.objects.exists()
