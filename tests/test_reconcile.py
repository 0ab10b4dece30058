"""The reconcile tick (Celery beat, every second in tests): repair, back-off, give up; it
decides and enqueues, and never waits for a process itself."""

from __future__ import annotations

import base64
import collections
import dataclasses
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import redis
from django.utils import timezone

from instances import process, services, supervisor, tasks
from instances.models import DesiredState, Heartbeat, Instance, OrphanProcess, Status
from tests.conftest import (
    FAKE_TEI,
    SESSION_ID,
    TEST_BROKER_URL,
    Worker,
    wait_for_new_process,
    wait_for_status,
    wait_until,
)

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_restarts_a_killed_instance(fake_worker: Worker) -> None:
    services.create_instance(name="victim", model_id="fake/model")
    first = wait_for_status("victim", Status.RUNNING, timeout=30)
    os.kill(first.pid, signal.SIGKILL)
    second = wait_for_new_process("victim", first.pid, 90, "running again with a new pid")
    assert second.restarts == 1
    assert f"process {first.pid} exited" in second.last_error
    assert not process.is_alive(first.pid, first.process_started_at)


def test_it_fails_a_crash_loop_with_its_reason(fake_worker: Worker) -> None:
    services.create_instance(name="crashy", model_id="crash/model")
    failed = wait_for_status("crashy", Status.FAILED, timeout=60)
    assert "crash loop" in failed.last_error
    assert "weights are corrupt" in failed.last_error
    assert failed.restarts == 2
    assert failed.pid is None
    # No restart storm: it stays failed.
    updated = failed.updated_at
    wait_until(lambda: Heartbeat.objects.get(name="reconcile").last_seen > updated, 10)
    assert Instance.objects.get(name="crashy").status == Status.FAILED


def test_it_fails_a_start_that_outlives_its_timeout(fake_worker: Worker) -> None:
    services.create_instance(name="slow", model_id="hang/model", startup_timeout_secs=2)
    wait_for_status("slow", Status.STARTING, timeout=30)
    wait_until(lambda: Instance.objects.get(name="slow").pid, 10, "a pid")
    pid = Instance.objects.get(name="slow").pid
    failed = wait_for_status("slow", Status.FAILED, timeout=30)
    assert "startup_timeout_secs=2" in failed.last_error
    assert "fake-tei" in failed.last_error  # the last log lines
    # The process is killed once the instance is marked failed.
    wait_until(lambda: not process.is_alive(pid, None), 15, "the timed-out process gone")


def test_it_heals_a_lost_message_on_the_next_tick(fake_worker: Worker, settings: Any) -> None:
    # A row saved without its start task, as if the broker had lost the message.
    Instance.objects.create(
        name="orphan",
        model_id="fake/model",
        port=_free_port(),
        prometheus_port=_free_port(1),
        node=settings.NODE_NAME,
    )
    running = wait_for_status("orphan", Status.RUNNING, timeout=30)
    assert process.is_alive(running.pid, running.process_started_at)


def test_it_stops_a_live_process_that_should_not_run(fake_worker: Worker) -> None:
    services.create_instance(name="unwanted", model_id="fake/model")
    running = wait_for_status("unwanted", Status.RUNNING, timeout=30)
    Instance.objects.filter(name="unwanted").update(desired_state=DesiredState.STOPPED)
    wait_for_status("unwanted", Status.STOPPED, timeout=30)
    assert not process.is_alive(running.pid, running.process_started_at)


def test_it_stops_the_process_of_a_deleted_instance(fake_worker: Worker) -> None:
    services.create_instance(name="deleted", model_id="fake/model")
    running = wait_for_status("deleted", Status.RUNNING, timeout=30)
    services.delete_instance("deleted")
    wait_until(lambda: not process.is_alive(running.pid, running.process_started_at), 30)
    wait_until(lambda: not OrphanProcess.objects.exists(), 10)


def test_it_stops_a_deleted_instance_whose_kill_message_was_lost(fake_worker: Worker) -> None:
    services.create_instance(name="lost-kill", model_id="fake/model")
    running = wait_for_status("lost-kill", Status.RUNNING, timeout=30)
    # What delete_instance leaves when the broker loses its kill message.
    Instance.objects.filter(name="lost-kill").delete()
    OrphanProcess.objects.create(
        node=running.node, name="lost-kill", pid=running.pid,
        process_started_at=running.process_started_at,
    )  # fmt: skip
    wait_until(lambda: not process.is_alive(running.pid, running.process_started_at), 30)
    wait_until(lambda: not OrphanProcess.objects.exists(), 10)


def test_it_restarts_an_instance_that_stops_answering(fake_worker: Worker) -> None:
    services.create_instance(name="frozen", model_id="fake/model")
    running = wait_for_status("frozen", Status.RUNNING, timeout=30)
    os.kill(running.pid, signal.SIGSTOP)  # alive, but no gRPC answer
    try:
        fresh = wait_for_new_process("frozen", running.pid, 60, "a new process")
    finally:
        if process.is_alive(running.pid, running.process_started_at):
            os.kill(running.pid, signal.SIGKILL)
    assert fresh.restarts == 1
    assert fresh.health_check_failures_total >= 3
    assert not process.is_alive(running.pid, running.process_started_at)


def test_it_fails_when_the_binary_cannot_be_executed(
    db: None, settings: Any, tmp_path: Any
) -> None:
    broken = tmp_path / "router"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(broken))
    instance = Instance.objects.create(
        name="nobin",
        model_id="m",
        port=_free_port(),
        prometheus_port=_free_port(1),
        node=settings.NODE_NAME,
    )
    supervisor.launch(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "cannot run" in instance.last_error and str(broken) in instance.last_error


def test_it_waits_for_the_back_off_before_relaunching(db: None, settings: Any) -> None:
    instance = Instance.objects.create(
        name="later",
        model_id="m",
        port=_free_port(),
        prometheus_port=_free_port(1),
        node=settings.NODE_NAME,
        next_restart_at=timezone.now() + timezone.timedelta(hours=1),
    )
    supervisor.reconcile_node(settings.NODE_NAME)
    instance.refresh_from_db()
    assert (instance.status, instance.pid) == (Status.PENDING, None)
    assert Heartbeat.objects.filter(name="reconcile").exists()


def _free_port(offset: int = 0) -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1]) + offset


@pytest.fixture
def idle_node() -> Iterator[str]:
    """A node no worker serves: what a tick enqueues for it stays in its queue."""
    node = f"idle-{SESSION_ID}"
    yield node
    client = redis.Redis.from_url(TEST_BROKER_URL)
    for key in client.scan_iter(f"*{node}*"):
        client.delete(key)


def queued(node: str) -> collections.Counter[tuple[str, int]]:
    """(task name, pk) of every instance task waiting in `node`'s queue (a running beat
    also sends its ticks there)."""
    client = redis.Redis.from_url(TEST_BROKER_URL)
    found: collections.Counter[tuple[str, int]] = collections.Counter()
    for raw in client.lrange(tasks.node_queue(node), 0, -1):
        message = json.loads(raw)
        name = message["headers"]["task"].rsplit(".", 1)[1]
        if name != "reconcile_node":
            found[(name, json.loads(base64.b64decode(message["body"]))[0][0])] += 1
    return found


def test_a_tick_decides_and_enqueues_without_spawning_or_stopping(
    idle_node: str, settings: Any
) -> None:
    # Any process spawned here by mistake would be a fake router that crashes at once.
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(FAKE_TEI))
    sleepers = [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(10)]
    children = {child.pid for child in psutil.Process().children()}
    now = timezone.now()
    long_ago = now - timezone.timedelta(seconds=60)
    rows = [
        *[dict(status=Status.RUNNING, pid=2**22 + i, process_started_at=1.0) for i in range(40)],
        *[dict(status=Status.PENDING) for _ in range(30)],
        *[dict(status=Status.STARTING, started_at=long_ago, launch_token="lost")] * 20,
        *[
            dict(status=Status.RUNNING, desired_state=DesiredState.STOPPED, pid=sleeper.pid,
                 process_started_at=psutil.Process(sleeper.pid).create_time())
            for sleeper in sleepers
        ],
    ]  # fmt: skip
    Instance.objects.bulk_create(
        Instance(name=f"tick-{i:03d}", model_id="crash/tick", port=50000 + i,
                 prometheus_port=51000 + i, node=idle_node, **fields)
        for i, fields in enumerate(rows)
    )  # fmt: skip
    Instance.objects.filter(status=Status.PENDING).update(updated_at=long_ago)
    pks = list(Instance.objects.order_by("name").values_list("pk", flat=True))
    try:
        tasks.reconcile_node(idle_node)

        expected = collections.Counter(("launch_instance", pk) for pk in pks[:90])
        expected.update(("stop_instance", pk) for pk in pks[90:])
        assert queued(idle_node) == expected
        after = {i.pk: i for i in Instance.objects.filter(node=idle_node)}
        assert [after[pk].status for pk in pks] == [Status.PENDING] * 90 + [Status.STOPPING] * 10
        assert [after[pk].restarts for pk in pks] == [1] * 40 + [0] * 30 + [1] * 20 + [0] * 10
        assert all("exited" in after[pk].last_error for pk in pks[:40])
        assert all("launch lost" in after[pk].last_error for pk in pks[70:90])
        # Nothing was spawned, and what should stop still runs until its stop task comes.
        assert {child.pid for child in psutil.Process().children()} == children
        assert all(sleeper.poll() is None for sleeper in sleepers)
    finally:
        for sleeper in sleepers:
            sleeper.kill()
            sleeper.wait()


def test_it_leaves_a_launch_in_progress_alone_and_relaunches_a_lost_one(
    idle_node: str, settings: Any
) -> None:
    now = timezone.now()
    for name, claimed in (("spawning", now), ("lost", now - timezone.timedelta(seconds=10))):
        Instance.objects.create(
            name=name, model_id="m", port=_free_port(), prometheus_port=_free_port(1),
            node=idle_node, status=Status.STARTING, started_at=claimed, launch_token=name,
        )  # fmt: skip
    work = supervisor.reconcile_node(idle_node)
    spawning, lost = Instance.objects.get(name="spawning"), Instance.objects.get(name="lost")
    assert work == [supervisor.Work(supervisor.LAUNCH, lost.pk)]
    assert (spawning.status, spawning.restarts, spawning.last_error) == (Status.STARTING, 0, "")
    assert (lost.status, lost.restarts, lost.pid) == (Status.PENDING, 1, None)
    assert lost.last_error.startswith("launch lost: no pid saved 10 s after the launch began")


def test_it_relaunches_a_launch_lost_after_its_spawn(fake_worker: Worker, settings: Any) -> None:
    # A pool process spawned the instance and died before it saved the pid. The claim is
    # fresh until the process exists (a tick in between must not see a launch lost before
    # its spawn), then it is thirty seconds old.
    row = Instance.objects.create(
        name="stray", model_id="fake/model", port=_free_port(), prometheus_port=_free_port(1),
        node=settings.NODE_NAME, status=Status.STARTING, launch_token="dead-worker",
        started_at=timezone.now(),
    )  # fmt: skip
    stray = process.spawn(row, str(FAKE_TEI), settings.LOG_DIR)
    Instance.objects.filter(pk=row.pk).update(
        started_at=timezone.now() - timezone.timedelta(seconds=30)
    )
    try:
        running = wait_for_new_process("stray", stray.pid, 30, "a fresh start")
        assert running.restarts == 1
        assert f"stopping the process it left ({stray.pid})" in running.last_error
        wait_until(lambda: not process.is_alive(stray.pid, stray.create_time), 10, "stray gone")
    finally:
        process.terminate(stray.pid, stray.create_time, 5)


def test_the_suite_publishes_to_its_own_broker_database(idle_node: str) -> None:
    # `make test` exports CELERY_BROKER_URL (the production default, Redis DB 0), which
    # Celery prefers to its configuration: the suite must still publish to its own DB.
    tasks.enqueue(tasks.kill_orphan, idle_node, [424242])
    assert queued(idle_node) == collections.Counter({("kill_orphan", 424242): 1})
