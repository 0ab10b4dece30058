"""Traces and JSON logs from the real processes, exported over OTLP/HTTP to a receiver the
test runs: a create on web (gunicorn) and its launch on a worker share one trace and one
request id, and so does a health repair and its relaunch; runmultiplexer traces its hop;
web, worker, beat and the multiplexer all write JSON lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from instances.models import Instance
from tests.conftest import FAKE_TEI, ROOT, SESSION_DIR, SESSION_ID, TEST_ENV, wait_until
from tests.live_web import LiveWeb, free_port
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.test_multiplexer import read_until

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiving = OtlpReceiver()
    yield receiving
    receiving.close()


def traced_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "TEI_MANAGER_LOG_FORMAT": "json",
    }


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` that is a JSON object (Celery's banner, say, is not)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def one_span(receiver: OtlpReceiver, name: str, test: Callable[[ReceivedSpan], bool]) -> Any:
    def find() -> ReceivedSpan | None:
        return next((span for span in receiver.named(name) if test(span)), None)

    return wait_until(find, 60, f"a {name} span")


@pytest.mark.django_db(transaction=True)
def test_a_create_and_its_launch_and_a_repair_and_its_relaunch_share_traces_and_request_ids(
    receiver: OtlpReceiver, start_worker: Callable[..., Any]
) -> None:
    node = f"traced-{SESSION_ID}"
    worker = start_worker(node, TEI_BINARY_PATH=str(FAKE_TEI), **traced_env(receiver))
    with LiveWeb("traced", TEI_MANAGER_NODE=node, **traced_env(receiver)) as web:
        body = json.dumps({"name": "traced", "model_id": "fake/model"}).encode()
        headers = {"Content-Type": "application/json", "X-Request-ID": "req-trace-1"}
        status, answer_headers, _ = web.request("POST", "/instances", body, headers)
        assert status == 201 and answer_headers["X-Request-ID"] == "req-trace-1"

        create = one_span(receiver, "instance.create", lambda s: True)
        assert create.service == "tei-manager-web"
        assert create.attributes["tei_manager.request_id"] == "req-trace-1"
        launch = one_span(receiver, "instance.launch", lambda s: s.trace_id == create.trace_id)
        assert launch.service == "tei-manager-worker"
        assert launch.parent_span_id == create.span_id
        assert launch.attributes["tei_manager.instance"] == "traced"
        assert launch.attributes["tei_manager.request_id"] == "req-trace-1"

        web_lines = json_lines(web.log_text())
        created = [line for line in web_lines if "created (fake/model)" in line["message"]]
        assert created and created[0]["request_id"] == "req-trace-1"
        assert created[0]["trace_id"] == create.trace_id and created[0]["service"] == "web"
        assert created[0]["level"] == "INFO" and created[0]["logger"] == "instances.services"
        assert any(line["logger"] == "gunicorn.error" for line in web_lines)

    row = wait_until(
        lambda: Instance.objects.filter(name="traced", status="running").exclude(pid=None).first(),
        60,
        "traced running",
    )
    worker_lines = json_lines(worker.log_text())
    started = [line for line in worker_lines if "started pid" in line["message"]]
    assert started[0]["request_id"] == "req-trace-1"
    assert started[0]["trace_id"] == create.trace_id and started[0]["service"] == "worker"

    os.killpg(row.pid, signal.SIGKILL)  # a crash: the tick repairs it
    try:
        repair = one_span(receiver, "instance.repair", lambda s: True)
    except AssertionError as exc:
        rows = list(Instance.objects.values("name", "status", "pid", "restarts", "last_error"))
        spans = [(span.name, span.service) for span in receiver.spans]
        raise AssertionError(f"{exc}\n{rows}\n{spans}\n{worker.log_text()[-4000:]}") from None
    assert repair.service == "tei-manager-worker"
    assert repair.attributes["tei_manager.instance"] == "traced"
    relaunch = one_span(receiver, "instance.launch", lambda s: s.trace_id == repair.trace_id)
    assert relaunch.parent_span_id == repair.span_id


@pytest.mark.django_db(transaction=True)
def test_runmultiplexer_traces_its_hop_and_writes_json_lines(receiver: OtlpReceiver) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runmultiplexer", "--host", "127.0.0.1", "--port",
         str(port), "--metrics-port", "0"],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV, **traced_env(receiver)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        started = json_lines(read_until(process, "is now running"))
        assert started[-1]["service"] == "multiplexer" and "tracing on" in started[-1]["message"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            with pytest.raises(grpc.RpcError) as raised:
                stub.Info(
                    mux.InfoRequest(target=mux.Target(instance_name="nobody")),
                    metadata=(("traceparent", TRACEPARENT),),
                    timeout=10,
                )
            assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        span = one_span(receiver, "tei_multiplexer.v1.TeiMultiplexer/Info", lambda s: True)
        assert span.service == "tei-manager-multiplexer"
        assert span.trace_id == TRACEPARENT.split("-")[1]
        assert span.parent_span_id == TRACEPARENT.split("-")[2]
        assert span.status_code == 2  # error
        process.send_signal(signal.SIGTERM)
        rest, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    lines = [line for line in rest.splitlines() if line.strip()]
    assert lines and all(line.startswith("{") for line in lines), rest
    assert json.loads(lines[-1])["message"] == "Done."


def test_beat_writes_json_lines(tmp_path: Path) -> None:
    env = {**os.environ, **TEST_ENV, "TEI_MANAGER_LOG_FORMAT": "json"}
    log = SESSION_DIR / f"beat-json-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "teimanager", "beat", "--schedule",
             str(tmp_path / "schedule"), "--loglevel", "INFO"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=out,
        )  # fmt: skip
    try:
        wait_until(lambda: "Sending due task" in log.read_text(), 60, "beat's first tick")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), log.read_text()  # all JSON
    records = [json.loads(line) for line in lines]
    assert all(record["service"] == "beat" for record in records[1:])
    assert any("Sending due task" in record["message"] for record in records)
