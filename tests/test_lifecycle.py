"""The lifecycle end to end, against a real worker and a real localtei: create → running
→ gRPC Embed on the instance → stop → start → restart → kill -9 → running again → delete."""

from __future__ import annotations

import os
import signal
from typing import Any

import grpc
import psutil
import pytest
from tei.v1 import tei_pb2, tei_pb2_grpc

from instances import process
from instances.models import Instance, Status
from tests.conftest import Worker, wait_for_new_process, wait_for_status, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def embed(instance: Instance) -> list[float]:
    """Straight to the instance's port, with its own key (without, it refuses)."""
    key = (("authorization", f"Bearer {instance.api_key}"),)
    with grpc.insecure_channel(instance.address) as channel:
        reply = tei_pb2_grpc.EmbedStub(channel).Embed(
            tei_pb2.EmbedRequest(inputs="hello world", normalize=True), timeout=30, metadata=key
        )
    return list(reply.embeddings)


def port_closed(port: int) -> bool:
    return process.port_is_free(port)


def test_it_runs_the_whole_lifecycle(manager_worker: Worker, api: Any, log_dir: Any) -> None:
    created = api.post(
        "/instances",
        {"name": "life", "model_id": "sentence-transformers/all-MiniLM-L6-v2"},
        format="json",
    )
    assert created.status_code == 201
    assert created.json()["status"] in (Status.PENDING, Status.STARTING)

    first = wait_for_status("life", Status.RUNNING)
    assert process.is_alive(first.pid, first.process_started_at)
    assert len(embed(first)) == 384
    log = (log_dir / "life.log").read_text()
    assert "--model-id sentence-transformers/all-MiniLM-L6-v2" in log
    assert f"--prometheus-port {first.prometheus_port}" in log
    assert "--json-output" in log and "--auto-truncate" in log

    assert api.post("/instances/life/stop").status_code == 200
    stopped = wait_for_status("life", Status.STOPPED, timeout=30)
    assert stopped.pid is None and stopped.desired_state == "stopped"
    assert not process.is_alive(first.pid, first.process_started_at)
    wait_until(lambda: not psutil.pid_exists(first.pid), 10, "the process reaped (no zombie)")
    wait_until(lambda: port_closed(first.port), 10, "the port to close")

    assert api.post("/instances/life/start").status_code == 200
    second = wait_for_status("life", Status.RUNNING)
    assert second.pid != first.pid
    assert len(embed(second)) == 384

    restarted = api.post("/instances/life/restart")
    assert restarted.status_code == 200
    third = wait_for_new_process("life", second.pid, 90, "a new running process")
    assert third.restarts == 1
    assert not process.is_alive(second.pid, second.process_started_at)

    os.kill(third.pid, signal.SIGKILL)
    fourth = wait_for_new_process("life", third.pid, 90, "running again after kill -9")
    assert fourth.restarts == 2
    assert f"process {third.pid} exited" in fourth.last_error
    assert len(embed(fourth)) == 384

    logs = api.get("/instances/life/logs?start=-5").json()
    assert logs["total_lines"] >= 5 and len(logs["lines"]) == 5

    assert api.delete("/instances/life").status_code == 200
    wait_until(lambda: not process.is_alive(fourth.pid, fourth.process_started_at), 30, "exit")
    wait_until(lambda: port_closed(fourth.port), 10, "the port to close")
    assert api.get("/instances/life").status_code == 404
