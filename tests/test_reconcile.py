"""The reconcile tick (Celery beat, every second in tests): repair, back-off, give up."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import pytest
from django.utils import timezone

from instances import process, services, supervisor
from instances.models import DesiredState, Heartbeat, Instance, OrphanProcess, Status
from tests.conftest import Worker, wait_for_new_process, wait_for_status, wait_until

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
