"""Failover decided in-process (nodes/failover.py, as the beat tick runs it): what moves off
a down node, where to, what it leaves to kill, and what a stale message on the old node
can no longer do. tests/test_two_nodes.py runs it for real."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings as django_settings

from instances import supervisor
from instances.models import Instance, OrphanProcess, Status
from nodes.failover import fail_over
from tests.test_nodes import make_instance, make_node

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def nodes() -> None:
    make_node("gone", seen_secs_ago=3600, port_start=8080, port_end=8089)
    make_node("there", instance_host="127.0.0.2", port_start=36000, port_end=36009,
              prometheus_port_start=36100, prometheus_port_end=36109)  # fmt: skip


def test_a_failover_instance_moves_to_an_up_node_and_leaves_its_process_to_kill(
    nodes: None,
) -> None:
    make_instance("mover", "gone", 8080, failover=True, status=Status.RUNNING, pid=4242,
                  process_started_at=12.5, launch_token="old", restarts=1)  # fmt: skip
    (move,) = fail_over()
    row = Instance.objects.get(name="mover")
    assert (move.old_node, move.new_node, move.name) == ("gone", "there", "mover")
    assert (row.node, row.host, row.port, row.prometheus_port) == (
        "there",
        "127.0.0.2",
        36000,
        36100,
    )
    assert (row.status, row.pid, row.restarts) == (Status.PENDING, None, 2)
    assert row.launch_token != "old" and "node 'gone' is down" in row.last_error
    orphan = OrphanProcess.objects.get(pk=move.orphan)
    assert (orphan.node, orphan.pid, orphan.process_started_at) == ("gone", 4242, 12.5)
    assert fail_over() == []  # moved once


def test_only_failover_instances_that_should_run_move(nodes: None) -> None:
    make_instance("pinned", "gone", 8080, status=Status.RUNNING, pid=1)
    make_instance("parked", "gone", 8081, failover=True, desired_state="stopped", status="stopped")
    make_instance("broken", "gone", 8082, failover=True, status=Status.FAILED)
    make_instance("fine", "there", 36000, failover=True, status=Status.RUNNING)
    assert fail_over() == []
    assert set(Instance.objects.values_list("name", "node")) == {
        ("pinned", "gone"), ("parked", "gone"), ("broken", "gone"), ("fine", "there"),
    }  # fmt: skip
    assert not OrphanProcess.objects.exists()


def test_with_no_up_node_it_stays_until_one_comes() -> None:
    make_node("gone", seen_secs_ago=3600)
    make_instance("waiting", "gone", 8080, failover=True, status=Status.RUNNING)
    assert fail_over() == []
    assert Instance.objects.get(name="waiting").node == "gone"
    make_node("new", port_start=37000, port_end=37009, prometheus_port_start=37100,
              prometheus_port_end=37109)  # fmt: skip
    (move,) = fail_over()
    assert move.new_node == "new" and move.orphan is None


def test_a_worker_ignores_messages_for_a_row_that_moved_to_another_node(settings: Any) -> None:
    make_node("gone", seen_secs_ago=3600)
    row = make_instance("moved", "elsewhere", 8080, status=Status.PENDING)
    assert row.node != django_settings.NODE_NAME
    supervisor.launch(row.pk)  # a launch sent to this node before the move
    row.refresh_from_db()
    assert (row.status, row.pid) == (Status.PENDING, None)
    Instance.objects.filter(pk=row.pk).update(status=Status.STOPPING, pid=1)
    supervisor.stop(row.pk)
    assert Instance.objects.get(pk=row.pk).status == Status.STOPPING
