"""A restart of the whole manager: live instances are adopted (same pid and start time),
dead ones restored when auto_restore_on_restart; a worker that exits (Ctrl-C on
`make run`) stops its instances and leaves nothing running."""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any

import pytest
from celery import signals

from instances import process, services, supervisor
from instances.models import DesiredState, Instance, Status
from tests.conftest import FAKE_TEI, SESSION_ID, wait_for_new_process, wait_for_status, wait_until
from tests.localtei_fixtures import free_port

pytestmark = pytest.mark.django_db(transaction=True)


def test_it_adopts_live_instances_and_restores_dead_ones(start_worker: Any, settings: Any) -> None:
    node = f"adopt-{SESSION_ID}"
    settings.NODE_NAME = node
    first_worker = start_worker(node, TEI_BINARY_PATH=str(FAKE_TEI))
    services.create_instance(name="kept", model_id="fake/kept")
    services.create_instance(name="lost", model_id="fake/lost")
    kept = wait_for_status("kept", Status.RUNNING, timeout=30)
    lost = wait_for_status("lost", Status.RUNNING, timeout=30)

    first_worker.kill()  # the manager crashes; its instances live on
    assert process.is_alive(kept.pid, kept.process_started_at)
    os.kill(lost.pid, signal.SIGKILL)  # and one instance dies while it is down
    wait_until(lambda: not process.is_alive(lost.pid, lost.process_started_at), 10)

    second_worker = start_worker(node, TEI_BINARY_PATH=str(FAKE_TEI))
    restored = wait_for_new_process("lost", lost.pid, 30, "the dead instance restored")
    assert restored.restarts == 1
    checked = kept.last_health_check
    adopted = wait_until(
        lambda: Instance.objects.filter(name="kept", last_health_check__gt=checked).first(),
        10,
        "a health check of the adopted instance",
    )
    assert (adopted.pid, adopted.process_started_at) == (kept.pid, kept.process_started_at)
    assert (adopted.status, adopted.restarts) == (Status.RUNNING, 0)

    second_worker.stop()  # Ctrl-C: stops every instance it runs
    for instance in (adopted, restored):
        assert not process.is_alive(instance.pid, instance.process_started_at)
        row = Instance.objects.get(pk=instance.pk)
        assert (row.status, row.pid, row.desired_state) == (Status.STOPPED, None, "running")


def test_a_worker_that_dies_of_an_error_leaves_its_instances_serving(settings: Any) -> None:
    """A worker that ends on an unrecoverable error (celery/kombu can, when Redis restarts
    under it) was not asked to stop: as after a crash, its instances keep serving for the
    next worker to adopt. One asked to stop (SIGTERM, Ctrl-C) stops them."""
    settings.NODE_NAME = f"erring-{SESSION_ID}"
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(FAKE_TEI))
    row = Instance.objects.create(
        name="serving", model_id="fake/serving", port=free_port(), prometheus_port=free_port(),
        node=settings.NODE_NAME,
    )  # fmt: skip
    supervisor.launch(row.pk)
    row.refresh_from_db()
    try:
        assert process.is_alive(row.pid, row.process_started_at)
        # What celery sends when its consumer raises: "Unrecoverable error", exit status 1.
        signals.worker_shutdown.send(sender=ExitingWorker(exitcode=1))
        assert process.is_alive(row.pid, row.process_started_at)
        assert Instance.objects.get(pk=row.pk).pid == row.pid
        # What it sends on SIGTERM, before it shuts down (and worker_shutdown after).
        signals.worker_shutting_down.send(sender="w@h", sig="SIGTERM", how="Warm", exitcode=0)
        signals.worker_shutdown.send(sender=ExitingWorker(exitcode=0))
        assert not process.is_alive(row.pid, row.process_started_at)
        stopped = Instance.objects.get(pk=row.pk)
        assert (stopped.status, stopped.pid, stopped.desired_state) == (
            Status.STOPPED, None, DesiredState.RUNNING
        )  # fmt: skip
    finally:
        process.terminate(row.pid, row.process_started_at, 5)


def test_it_parks_dead_instances_when_auto_restore_is_off(db: None, settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, auto_restore_on_restart=False)
    instance = _dead_instance(settings.NODE_NAME)
    assert supervisor.restore_node(settings.NODE_NAME) == []
    instance.refresh_from_db()
    assert (instance.status, instance.desired_state) == (Status.STOPPED, DesiredState.STOPPED)
    assert "auto_restore_on_restart" in instance.last_error


def test_it_restores_dead_instances_when_auto_restore_is_on(db: None, settings: Any) -> None:
    instance = _dead_instance(settings.NODE_NAME)
    assert supervisor.restore_node(settings.NODE_NAME) == [instance.pk]
    instance.refresh_from_db()
    assert (instance.status, instance.pid, instance.restarts) == (Status.PENDING, None, 1)


def test_it_does_not_take_a_reused_pid_for_the_instance(db: None, settings: Any) -> None:
    # This test process is alive, but it started at another time: not the instance.
    instance = Instance.objects.create(
        name="reused",
        model_id="m",
        port=41001,
        prometheus_port=41002,
        node=settings.NODE_NAME,
        status=Status.RUNNING,
        pid=os.getpid(),
        process_started_at=1.0,
    )
    assert supervisor.restore_node(settings.NODE_NAME) == [instance.pk]


class ExitingWorker:
    """The sender of worker_shutdown: celery's WorkController, with its exit status."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode = exitcode


def _dead_instance(node: str) -> Instance:
    """A row that says running, with a pid no live process has (above Linux's pid_max)."""
    return Instance.objects.create(
        name="dead",
        model_id="m",
        port=41001,
        prometheus_port=41002,
        node=node,
        status=Status.RUNNING,
        pid=2**22 + 1,
        process_started_at=1.0,
    )
