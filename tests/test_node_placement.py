"""Placement: which node a create lands on, the errors for a node asked by name, and the
ports a node gives out (nodes/placement.py through the lifecycle service and the API)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from instances import services
from instances.models import Instance
from tests.test_nodes import GIB, make_instance, make_node

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def spread(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, placement="spread")


def create(name: str, **fields: Any) -> Instance:
    return services.create_instance(name=name, model_id="org/model", **fields)


def gpu(free: int) -> list[dict[str, Any]]:
    return [{"index": 0, "name": "L4", "memory_total_bytes": 24 * GIB, "memory_free_bytes": free}]


def test_a_create_goes_to_the_up_node_with_the_fewest_instances(spread: None) -> None:
    make_node(
        "a",
        port_start=31000,
        port_end=31009,
        prometheus_port_start=31100,
        prometheus_port_end=31109,
    )
    make_node("b", instance_host="127.0.0.2", port_start=32000, port_end=32009)
    make_node("c", seen_secs_ago=3600)  # down: never chosen
    make_instance("old", "a", 31005)
    placed = [create(f"i{n}") for n in range(3)]
    assert [(i.node, i.host) for i in placed] == [
        ("b", "127.0.0.2"),  # a has one already
        ("a", "127.0.0.1"),  # one each: by name
        ("b", "127.0.0.2"),
    ]
    # Each from its own node's ranges.
    assert [i.port for i in placed] == [32000, 31000, 32001]
    assert placed[1].prometheus_port == 31100


def test_free_gpu_memory_breaks_a_tie(spread: None) -> None:
    make_node("a", gpus=gpu(2 * GIB))
    make_node("b", gpus=gpu(20 * GIB))
    assert create("big").node == "b"


def test_a_node_without_a_free_port_has_no_room(spread: None) -> None:
    make_node("full", port_start=33000, port_end=33000)
    make_node("roomy", port_start=34000, port_end=34009)
    make_instance("x", "full", 33000)
    make_instance("y", "roomy", 34000)
    make_instance("z", "roomy", 34001)
    assert create("next").node == "roomy"


def test_ports_are_unique_per_node_not_across_nodes(spread: None) -> None:
    make_node("a", port_start=35000, port_end=35009)
    make_node("b", port_start=35000, port_end=35009)
    first = create("one", node="a", port=35003, prometheus_port=35004)
    second = create("two", node="b", port=35003, prometheus_port=35004)
    assert (first.node, first.port, second.node, second.port) == ("a", 35003, "b", 35003)


def test_without_a_registered_node_a_create_stays_on_this_node(spread: None, settings: Any) -> None:
    instance = create("alone")
    assert (instance.node, instance.host) == (settings.NODE_NAME, settings.INSTANCE_HOST)


def test_local_placement_keeps_creates_on_this_node(settings: Any) -> None:
    make_node("elsewhere")
    assert settings.TEI.placement == "local"
    assert create("here").node == settings.NODE_NAME


def test_a_create_on_a_named_node_goes_there(spread: None) -> None:
    make_node("a")
    make_node("b")
    make_instance("busy", "b", 8080)
    assert create("pinned", node="b").node == "b"


def test_the_api_refuses_an_unknown_or_down_node(spread: None, api: Any) -> None:
    make_node("gone", seen_secs_ago=3600)
    response = api.post("/instances", {"name": "x", "model_id": "m", "node": "nowhere"}, "json")
    assert (response.status_code, response.json()["code"]) == (404, "NODE_NOT_FOUND")
    response = api.post("/instances", {"name": "x", "model_id": "m", "node": "gone"}, "json")
    assert (response.status_code, response.json()["code"]) == (409, "NODE_DOWN")
    assert "gone" in response.json()["error"]
    # Every registered node down: nowhere to place it.
    response = api.post("/instances", {"name": "x", "model_id": "m"}, "json")
    assert (response.status_code, response.json()["code"]) == (409, "NODE_DOWN")
    assert not Instance.objects.exists()


def test_failover_comes_from_the_request_or_the_default(settings: Any, api: Any) -> None:
    assert create("plain").failover is False
    assert create("asked", failover=True).failover is True
    settings.TEI = dataclasses.replace(settings.TEI, failover_default=True)
    response = api.post("/instances", {"name": "defaulted", "model_id": "m"}, "json")
    assert response.status_code == 201 and response.json()["failover"] is True
    response = api.post("/instances", {"name": "n", "model_id": "m", "failover": "x"}, "json")
    assert (response.status_code, response.json()["code"]) == (400, "VALIDATION_ERROR")


def test_the_admin_add_form_places_on_a_named_node_or_says_why_not(
    spread: None, admin_client: Any, settings: Any
) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    make_node("gpu-b", instance_host="10.0.0.2", port_start=38000, port_end=38009)
    add = "/admin/instances/instance/add/"
    form = {"name": "lost", "model_id": "org/model", "node": "nowhere", "failover": ""}
    refused = admin_client.post(add, form)
    assert refused.status_code == 200
    errors = refused.context["adminform"].form.errors
    assert list(errors) == ["node"] and "nowhere" in errors["node"][0]
    placed = admin_client.post(add, {**form, "name": "placed", "node": "gpu-b", "failover": "true"})
    assert placed.status_code == 302
    made = Instance.objects.get(name="placed")
    assert (made.node, made.host, made.port, made.failover) == ("gpu-b", "10.0.0.2", 38000, True)
    page = admin_client.get(f"/admin/instances/instance/{made.pk}/change/").content.decode()
    assert "gpu-b" in page
