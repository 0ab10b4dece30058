"""The node registry: what a worker writes about its node, up and down, GET /nodes, the
Nodes admin page, and instances on a down node shown (and routed) as unreachable."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from instances.models import Instance
from multiplexer.refresher import load_routing_table
from multiplexer.routing import RoutingError
from multiplexer.wire import Target
from nodes import registry
from nodes.models import Node, NodeStatus
from tests.conftest import TEST_NODE, Worker
from tests.fake_nvml import use_fake_gpus, use_no_nvml
from tests.stack import wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

GIB = 2**30


def make_node(name: str, seen_secs_ago: float = 0, **fields: Any) -> Node:
    values: dict[str, Any] = {
        "instance_host": "127.0.0.1",
        "port_start": 8080,
        "port_end": 8179,
        "prometheus_port_start": 9100,
        "prometheus_port_end": 9199,
        "last_seen": timezone.now() - timedelta(seconds=seen_secs_ago),
    }
    values.update(fields)
    return Node.objects.create(name=name, **values)


def make_instance(name: str, node: str, port: int, **fields: Any) -> Instance:
    fields.setdefault("model_id", "org/model")
    return Instance.objects.create(
        name=name, node=node, port=port, prometheus_port=port + 1000, **fields
    )


def test_a_worker_registers_its_node_with_its_capacity(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(
        monkeypatch, [("NVIDIA A100", 10 * GIB, 40 * GIB, 5), ("NVIDIA L4", 0, 24 * GIB, 0)]
    )
    node = registry.register("gpu-host")
    assert node.instance_host == django_settings.INSTANCE_HOST
    config = django_settings.TEI
    assert (node.port_start, node.port_end) == (
        config.instance_port_start,
        config.instance_port_end,
    )
    assert (node.prometheus_port_start, node.prometheus_port_end) == (
        config.prometheus_port_start,
        config.prometheus_port_end,
    )
    memory = [
        (g["index"], g["name"], g["memory_total_bytes"], g["memory_free_bytes"]) for g in node.gpus
    ]
    assert memory == [(0, "NVIDIA A100", 40 * GIB, 30 * GIB), (1, "NVIDIA L4", 24 * GIB, 24 * GIB)]
    assert node.cpu_count >= 1 and node.ram_bytes > GIB and node.version
    assert node.status == NodeStatus.UP


def test_a_heartbeat_refreshes_the_row_and_forgets_gpus_that_went(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    use_fake_gpus(monkeypatch, [("NVIDIA L4", 0, 24 * GIB, 0)])
    first = registry.register("gpu-host")
    Node.objects.filter(pk=first.pk).update(last_seen=timezone.now() - timedelta(hours=1))
    use_no_nvml(monkeypatch)
    second = registry.register("gpu-host")
    assert second.pk == first.pk and Node.objects.count() == 1
    assert second.gpus == [] and second.status == NodeStatus.UP


def test_a_node_is_down_once_its_heartbeat_is_older_than_the_timeout() -> None:
    timeout = django_settings.TEI.node_timeout_secs
    fresh = make_node("fresh", seen_secs_ago=timeout - 5)
    stale = make_node("stale", seen_secs_ago=timeout + 1)
    assert (fresh.status, stale.status) == (NodeStatus.UP, NodeStatus.DOWN)
    assert list(Node.objects.up()) == [fresh] and list(Node.objects.down()) == [stale]


def test_get_nodes_lists_every_node_with_its_status_and_instance_count(api: Any) -> None:
    make_node(
        "a", gpus=[{"index": 0, "name": "L4", "memory_total_bytes": 8, "memory_free_bytes": 6}]
    )
    make_node("b", seen_secs_ago=3600, instance_host="10.0.0.2")
    make_instance("one", "a", 8080)
    make_instance("two", "a", 8081)
    response = api.get("/nodes")
    assert response.status_code == 200
    rows = {row["name"]: row for row in response.json()}
    assert set(rows) == {"a", "b"}
    assert (rows["a"]["status"], rows["a"]["instances"]) == ("up", 2)
    assert rows["a"]["gpus"][0]["memory_free_bytes"] == 6
    assert (rows["b"]["status"], rows["b"]["instances"], rows["b"]["instance_host"]) == (
        "down",
        0,
        "10.0.0.2",
    )
    assert rows["b"]["last_seen"].endswith("Z")


def test_get_node_answers_one_node_or_node_not_found(api: Any) -> None:
    make_node("a")
    assert api.get("/nodes/a").json()["name"] == "a"
    response = api.get("/nodes/nowhere")
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "NODE_NOT_FOUND" and "nowhere" in body["error"]
    assert set(body) == {"error", "code", "timestamp"}


def test_instances_on_a_down_node_are_shown_unreachable(api: Any) -> None:
    make_node("up")
    make_node("gone", seen_secs_ago=3600)
    make_instance("here", "up", 8080, status="running")
    make_instance("there", "gone", 8081, status="running")
    make_instance("unregistered", "laptop", 8082, status="running")
    listed = {row["name"]: row["reachable"] for row in api.get("/instances").json()}
    assert listed == {"here": True, "there": False, "unregistered": True}
    assert api.get("/instances/there").json()["reachable"] is False
    assert api.get("/instances/here").json()["reachable"] is True


def test_the_routing_table_refuses_instances_on_a_down_node_and_dials_the_nodes_host() -> None:
    make_node("up", instance_host="10.0.0.1")
    make_node("gone", seen_secs_ago=3600, instance_host="10.0.0.2")
    make_instance("here", "up", 8080, status="running", host="127.0.0.1")
    make_instance("there", "gone", 8081, status="running", model_id="org/other")
    make_instance("local", "laptop", 8082, status="running", host="127.0.0.9")
    table = load_routing_table()
    assert table.by_name["here"].address == "10.0.0.1:8080"
    assert table.by_name["local"].address == "127.0.0.9:8082"
    assert [route.name for route in table.running] == ["here", "local"]
    with pytest.raises(RoutingError) as refused:
        table.candidates(Target(instance_name="there"))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    assert "node 'gone' is down" in refused.value.message
    with pytest.raises(RoutingError) as refused:
        table.candidates(Target(model_id="org/other"))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_the_nodes_admin_page_shows_up_and_down_read_only(admin_client: Client) -> None:
    make_node("alpha")
    make_node("beta", seen_secs_ago=3600)
    page = admin_client.get("/admin/nodes/node/")
    assert page.status_code == 200
    text = page.content.decode()
    assert 'tei-badge--up">up<' in text and 'tei-badge--down">down<' in text
    assert admin_client.get("/admin/nodes/node/add/").status_code == 403
    beta = Node.objects.get(name="beta")
    detail = admin_client.get(f"/admin/nodes/node/{beta.pk}/change/")
    assert detail.status_code == 200 and "down" in detail.content.decode()


def test_the_instance_list_marks_instances_on_a_down_node(admin_client: Client) -> None:
    make_node("up")
    make_node("gone", seen_secs_ago=3600)
    make_instance("here", "up", 8080, status="running")
    make_instance("there", "gone", 8081, status="running")
    text = admin_client.get("/admin/instances/instance/").content.decode()
    assert text.count('tei-badge--down">down<') == 1
    row = text[text.index(">there<") :]
    assert row.index("gone") < row.index('tei-badge--down">down<') < row.index("</tr>")


@pytest.mark.django_db(transaction=True)
def test_a_running_worker_keeps_its_node_up(manager_worker: Worker) -> None:
    node = wait_until(
        lambda: Node.objects.filter(name=TEST_NODE).first(), 15, "the worker's node row"
    )
    seen = node.last_seen
    wait_until(lambda: Node.objects.get(name=TEST_NODE).last_seen > seen, 15, "a second heartbeat")
    assert Node.objects.get(name=TEST_NODE).status == NodeStatus.UP
