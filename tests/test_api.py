"""The REST API: every endpoint of DESIGN.md's table and every error code, with the
`{"error", "code", "timestamp"}` envelope. No worker: tasks are never enqueued here
(pytest-django's `db` never commits, so on_commit does not fire)."""

from __future__ import annotations

import dataclasses
import socket
from datetime import UTC, datetime
from typing import Any

import pytest
from django.conf import settings

from instances import gpu
from instances.models import Heartbeat, Instance, Status
from tests.fake_nvml import use_fake_gpus, use_no_nvml
from tests.stack import free_ports

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def create(api: Any, **fields: Any) -> Any:
    return api.post("/instances", {"model_id": MODEL, **fields}, format="json")


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error", "code", "timestamp"}
    assert body["code"] == code
    assert body["error"]
    assert body["timestamp"].endswith("Z")  # UTC, written as every time in the API
    datetime.fromisoformat(body["timestamp"])
    return body


def test_it_creates_an_instance_at_once_with_allocated_ports(api: Any, settings: Any) -> None:
    response = create(api, name="minilm")
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "minilm"
    assert body["status"] == Status.PENDING
    assert body["desired_state"] == "running"
    assert body["max_batch_tokens"] == 16384
    assert body["max_concurrent_requests"] == 512
    assert body["startup_timeout_secs"] == settings.TEI.startup_timeout_secs
    assert settings.TEI.instance_port_start <= body["port"] <= settings.TEI.instance_port_end
    start, end = settings.TEI.prometheus_port_start, settings.TEI.prometheus_port_end
    assert start <= body["prometheus_port"] <= end
    assert body["node"] == settings.NODE_NAME


def test_it_allocates_distinct_ports_and_skips_ports_bound_on_the_host(
    api: Any, settings: Any
) -> None:
    first = settings.TEI.instance_port_start
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", first))
        busy.listen()
        one = create(api, name="one").json()
    two = create(api, name="two").json()
    assert one["port"] == first + 1
    assert two["port"] == first
    assert len({one["port"], two["port"], one["prometheus_port"], two["prometheus_port"]}) == 4


def test_it_accepts_every_optional_field(api: Any) -> None:
    port, prometheus_port = free_ports(2)
    response = create(
        api,
        name="full",
        port=port,
        prometheus_port=prometheus_port,
        max_batch_tokens=1024,
        max_concurrent_requests=8,
        pooling="mean",
        startup_timeout_secs=30,
        extra_args=["--dtype", "float32"],
        auto_truncate=False,
    )
    assert response.status_code == 201, response.content
    instance = Instance.objects.get(name="full")
    assert (instance.port, instance.prometheus_port) == (port, prometheus_port)
    assert instance.pooling == "mean"
    assert instance.extra_args == ["--dtype", "float32"]


def test_it_lists_and_gets_instances(api: Any) -> None:
    create(api, name="b")
    create(api, name="a")
    listed = api.get("/instances")
    assert listed.status_code == 200
    assert [i["name"] for i in listed.json()] == ["a", "b"]
    one = api.get("/instances/a")
    assert one.status_code == 200
    assert one.json()["model_id"] == MODEL


def test_it_lists_exactly_what_it_shows_one_by_one(api: Any) -> None:
    create(api, name="plain")
    create(api, name="full", gpu_id=None, pooling="splade", auto_truncate=False,
           extra_args=["--dtype", "float16", "ünïcode \"quoted\""])  # fmt: skip
    moment = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    Instance.objects.filter(name="full").update(
        started_at=moment, last_health_check=moment.replace(microsecond=120), pid=42
    )
    listed = api.get("/instances").json()
    assert listed == [api.get(f"/instances/{row['name']}").json() for row in listed]
    assert listed[0]["started_at"] == "2026-01-02T03:04:05Z"
    assert listed[0]["last_health_check"] == "2026-01-02T03:04:05.000120Z"
    assert listed[0]["auto_truncate"] is False


def test_it_refuses_a_duplicate_name(api: Any) -> None:
    create(api, name="dup")
    assert_error(create(api, name="dup"), 409, "INSTANCE_EXISTS")


def test_it_refuses_a_port_taken_by_another_instance(api: Any) -> None:
    [port] = free_ports(1)
    assert create(api, name="first", port=port).status_code == 201
    assert_error(create(api, name="second", port=port), 422, "PORT_CONFLICT")
    assert_error(create(api, name="third", prometheus_port=port), 422, "PORT_CONFLICT")


def test_it_refuses_a_port_bound_on_the_host(api: Any) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        if port < 1024:
            pytest.skip("ephemeral port below 1024")
        assert_error(create(api, name="bound", port=port), 422, "PORT_CONFLICT")


def test_it_refuses_more_than_max_instances(api: Any, settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, max_instances=2)
    create(api, name="one")
    create(api, name="two")
    assert_error(create(api, name="three"), 422, "MAX_INSTANCES_REACHED")


@pytest.mark.parametrize(
    "fields",
    [
        {"name": "../etc/passwd"},
        {"name": "a/b"},
        {"name": ".hidden"},
        {"name": "-flag"},
        {"name": "with space"},
        {"name": ""},
        {"name": "x" * 65},
        {"name": "ok", "model_id": "--help"},
        {"name": "ok", "model_id": "-m"},
        {"name": "ok", "model_id": ""},
        {"name": "ok", "model_id": "model; rm -rf /"},
        {"name": "ok", "pooling": "max"},
        {"name": "ok", "extra_args": "--dtype float16"},
        {"name": "ok", "extra_args": [1, 2]},
        {"name": "ok", "extra_args": ["--port", "1"]},
        {"name": "ok", "extra_args": ["--model-id=other"]},
        {"name": "ok", "max_batch_tokens": 0},
        {"name": "ok", "max_concurrent_requests": -1},
        {"name": "ok", "startup_timeout_secs": 0},
        {"name": "ok", "unknown_field": 1},
    ],
)
def test_it_refuses_invalid_fields(api: Any, fields: dict[str, Any]) -> None:
    body = assert_error(create(api, **fields), 400, "VALIDATION_ERROR")
    assert ":" in body["error"]  # names the field
    assert not Instance.objects.exists()


def test_it_requires_name_and_model_id(api: Any) -> None:
    body = assert_error(api.post("/instances", {}, format="json"), 400, "VALIDATION_ERROR")
    assert "required" in body["error"]


@pytest.mark.parametrize("port", [80, 1023, 65536, -1, "abc"])
def test_it_refuses_invalid_ports(api: Any, port: Any) -> None:
    assert_error(create(api, name="p", port=port), 400, "INVALID_PORT")
    assert_error(create(api, name="p", prometheus_port=port), 400, "INVALID_PORT")


def test_it_checks_gpu_id_against_nvml(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, [("A", 0, 1, 0), ("B", 0, 1, 0)])
    body = assert_error(create(api, name="gpu", gpu_id=2), 400, "INVALID_GPU_ID")
    assert "2 GPU" in body["error"]
    assert create(api, name="gpu", gpu_id=1).status_code == 201
    assert_error(create(api, name="neg", gpu_id=-1), 400, "INVALID_GPU_ID")


def test_it_accepts_a_gpu_id_when_there_is_no_gpu_to_check(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_no_nvml(monkeypatch)
    assert gpu.device_count() is None  # no NVML: nothing to check against
    assert create(api, name="gpu", gpu_id=3).status_code == 201


def test_it_answers_404_for_unknown_instances(api: Any) -> None:
    for method, path in [
        ("get", "/instances/nope"),
        ("delete", "/instances/nope"),
        ("post", "/instances/nope/start"),
        ("post", "/instances/nope/stop"),
        ("post", "/instances/nope/restart"),
        ("get", "/instances/nope/logs"),
    ]:
        assert_error(getattr(api, method)(path), 404, "INSTANCE_NOT_FOUND")


def test_it_deletes_an_instance(api: Any) -> None:
    create(api, name="gone")
    response = api.delete("/instances/gone")
    assert response.status_code == 200
    assert response.json() == {"name": "gone", "deleted": True}
    assert_error(api.get("/instances/gone"), 404, "INSTANCE_NOT_FOUND")


def test_it_starts_stops_and_restarts_through_the_desired_state(api: Any) -> None:
    create(api, name="x")
    assert_error(api.post("/instances/x/start"), 409, "ALREADY_RUNNING")

    stopped = api.post("/instances/x/stop")
    assert stopped.status_code == 200
    assert (stopped.json()["status"], stopped.json()["desired_state"]) == ("stopping", "stopped")

    Instance.objects.filter(name="x").update(status=Status.STOPPED)
    assert_error(api.post("/instances/x/stop"), 409, "NOT_RUNNING")

    started = api.post("/instances/x/start")
    assert started.status_code == 200
    assert (started.json()["status"], started.json()["desired_state"]) == ("pending", "running")

    Instance.objects.filter(name="x").update(status=Status.RUNNING)
    restarted = api.post("/instances/x/restart")
    assert restarted.status_code == 200
    assert restarted.json()["status"] == "pending"
    assert restarted.json()["restarts"] == 1


def test_it_starts_a_failed_instance_and_clears_its_error(api: Any) -> None:
    create(api, name="f")
    Instance.objects.filter(name="f").update(status=Status.FAILED, last_error="boom")
    assert_error(api.post("/instances/f/stop"), 409, "NOT_RUNNING")
    body = api.post("/instances/f/start").json()
    assert (body["status"], body["last_error"]) == ("pending", "")


def test_it_reads_logs_with_python_slices(api: Any, log_dir: Any) -> None:
    create(api, name="logged")
    (log_dir / "logged.log").write_text("".join(f"line {i}\n" for i in range(10)))

    def logs(query: str) -> dict[str, Any]:
        response = api.get(f"/instances/logged/logs{query}")
        assert response.status_code == 200
        return response.json()

    everything = logs("")
    assert everything["total_lines"] == 10
    assert everything["lines"][0] == "line 0"
    assert (everything["start"], everything["end"]) == (0, 10)
    last = logs("?start=-3")
    assert last["lines"] == ["line 7", "line 8", "line 9"]
    assert (last["start"], last["end"]) == (7, 10)
    assert logs("?start=2&end=4")["lines"] == ["line 2", "line 3"]
    assert logs("?start=2&end=-7")["lines"] == ["line 2"]
    assert logs("?start=50")["lines"] == []
    assert logs("?end=-8")["lines"] == ["line 0", "line 1"]
    assert_error(api.get("/instances/logged/logs?start=x"), 400, "VALIDATION_ERROR")
    (log_dir / "logged.log").unlink()
    assert logs("") == {"lines": [], "start": 0, "end": 0, "total_lines": 0}


def test_it_answers_unknown_paths_with_the_envelope(api: Any) -> None:
    assert_error(api.get("/nope"), 404, "NOT_FOUND")
    assert_error(api.get("/instances/"), 404, "NOT_FOUND")
    assert_error(api.post("/instances/a/b/c"), 404, "NOT_FOUND")


def test_it_answers_wrong_methods_with_the_envelope(api: Any) -> None:
    create(api, name="m")
    assert_error(api.put("/instances/m", {}, format="json"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.patch("/instances/m", {}, format="json"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.get("/instances/m/start"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.delete("/instances"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.post("/metrics"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.post("/health"), 405, "METHOD_NOT_ALLOWED")


def test_it_answers_malformed_json_with_the_envelope(api: Any) -> None:
    response = api.post("/instances", '{"name": "x", ', content_type="application/json")
    assert_error(response, 400, "MALFORMED_JSON")
    body = api.post("/instances", "[1, 2]", content_type="application/json")
    assert_error(body, 400, "VALIDATION_ERROR")
    form = api.post("/instances", {"name": "x", "model_id": MODEL})
    assert_error(form, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_it_reports_health_with_heartbeats(api: Any) -> None:
    # The whole verdict is tests/test_health.py's; here, the shape of a healthy answer.
    for name in ("beat", "reconcile", "multiplexer", f"worker.{settings.NODE_NAME}"):
        Heartbeat.beat(name)
    response = api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["heartbeats"]["reconcile"].endswith("Z")
    assert body["stale"] == []


def test_it_serves_metrics(api: Any) -> None:
    create(api, name="counted")
    response = api.get("/metrics")
    assert response.status_code == 200
    text = response.content.decode()
    assert "tei_manager_instances_count 1.0" in text
    assert "tei_manager_instances_created_total 1.0" in text


def test_it_serves_the_openapi_schema_and_swagger_ui(api: Any) -> None:
    schema = api.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    text = schema.content.decode()
    for path in ("/instances", "/instances/{name}/start", "/instances/{name}/logs"):
        assert path in text
    docs = api.get("/api/docs")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()
