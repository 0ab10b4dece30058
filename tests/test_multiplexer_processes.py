"""`runmultiplexer --processes N`: N server processes on the same ports, kept by a parent.

Real processes: `manage.py runmultiplexer --processes 2` in front of a real localtei
(all-MiniLM-L6-v2). Which process served a call is read from its own metrics file in
PROMETHEUS_MULTIPROC_DIR; the kernel spreads connections, so each call opens its own.
The parts that need no server are in tests/test_multiplexer_supervisor.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.ports import startup_lock
from multiplexer.processes import process_files
from tests.conftest import ROOT, TEST_ENV
from tests.localtei_fixtures import MINILM_ID, LocalTEI, free_port, start_localtei
from tests.test_multiplexer_supervisor import gone, reuse_port_listener

NODE = "multiplexer-processes-tests"
REQUESTS = "tei_manager_multiplexer_requests_total"
HTTP_REQUESTS = "tei_manager_multiplexer_http_requests_total"


@pytest.fixture(scope="module")
def minilm() -> Iterator[LocalTEI]:
    with start_localtei(MINILM_ID) as server:
        yield server


@pytest.fixture
def row(minilm: LocalTEI) -> None:
    from instances.models import Instance

    Instance.objects.create(
        name="minilm",
        model_id=MINILM_ID,
        port=minilm.port,
        prometheus_port=minilm.prometheus_port,
        status="running",
        node=NODE,
    )


class Multiplexer:
    """`manage.py runmultiplexer ARGS` with its output collected line by line."""

    def __init__(self, *args: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "runmultiplexer", "--host", "127.0.0.1", *args],
            cwd=ROOT,
            env={**os.environ, **TEST_ENV, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # type: ignore[union-attr]
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                found = re.search(pattern, line)
                if found:
                    return found
            if time.monotonic() > deadline or self.process.poll() is not None:
                time.sleep(0.2)  # the reader may still hold the last lines
                raise AssertionError(f"no line matching {pattern!r} in:\n{self.output}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        found = self.wait_for(r"is now running.* processes \(pids ([\d, ]+)\)")
        return [int(pid) for pid in found.group(1).split(", ")]

    def finish(self, timeout: float = 120) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def start() -> Iterator[Callable[..., Multiplexer]]:
    started: list[Multiplexer] = []

    def run(*args: str, **env: str) -> Multiplexer:
        started.append(Multiplexer(*args, **env))
        return started[-1]

    yield run
    for multiplexer in started:
        multiplexer.stop()


def ports() -> dict[str, int]:
    return {"grpc": free_port(), "http": free_port(), "metrics": free_port()}


def two_processes(
    start: Callable[..., Multiplexer], tmp_path: Path, grace: str = "10"
) -> tuple[Multiplexer, dict[str, int]]:
    used = ports()
    multiplexer = start(
        "--processes", "2", "--port", str(used["grpc"]), "--http-port", str(used["http"]),
        "--metrics-port", str(used["metrics"]), "--grace", grace,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )  # fmt: skip
    return multiplexer, used


def embed_once(port: int, text: str = "hello") -> None:
    """One Embed on a connection of its own (the kernel picks a process per connection)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        request = tei_pb2.EmbedRequest(inputs=text)
        reply = stub.Embed(
            mux.EmbedRequest(target=mux.Target(instance_name="minilm"), request=request),
            wait_for_ready=True,
            timeout=30,
        )
        assert len(reply.embeddings) == 384


def embed_over_http(port: int) -> None:
    body = json.dumps({"inputs": "hello"}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/instances/minilm/embed",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        assert reply.status == 200 and len(json.loads(reply.read())[0]) == 384


def calls_served_by(directory: Path, pid: int) -> float:
    """gRPC and HTTP calls the process `pid` counted in its own metrics files."""
    total = 0.0
    for metric in MultiProcessCollector.merge(process_files(str(directory), [pid])):
        for sample in metric.samples:
            if sample.name in (REQUESTS, HTTP_REQUESTS):
                total += sample.value
    return total


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict[Any, float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting: {what}"
        time.sleep(0.05)


def serve_until_each_took_calls(
    used: dict[str, int], directory: Path, pids: list[int], limit: int = 300
) -> int:
    """Embed on fresh connections until every process in `pids` has served one; the count."""
    for made in range(1, limit + 1):
        embed_once(used["grpc"])
        if all(calls_served_by(directory, pid) > 0 for pid in pids):
            return made
    raise AssertionError(f"{limit} connections and still not every process took a call")


@pytest.mark.django_db(transaction=True)
def test_two_processes_share_the_ports_and_the_metrics_port_sums_them(
    row: None, start: Callable[..., Multiplexer], tmp_path: Path
) -> None:
    multiplexer, used = two_processes(start, tmp_path)
    pids = multiplexer.pids()
    parent = multiplexer.process.pid
    assert len(set(pids)) == 2 and all(parent_of(pid) == parent for pid in pids)
    # The parent forks again later: it must still run no thread but its own.
    assert len(os.listdir(f"/proc/{parent}/task")) == 1
    made = serve_until_each_took_calls(used, tmp_path, pids)
    for _ in range(6):
        embed_over_http(used["http"])
    # Each process counted its own calls; port 9002's view is their sum.
    assert sum(calls_served_by(tmp_path, pid) for pid in pids) == made + 6
    scraped = scrape(used["metrics"])
    assert value(scraped, REQUESTS, instance="minilm", method="Embed") == made
    http = {"instance": "minilm", "route": "/instances/{name}/embed", "status": "200"}
    assert value(scraped, HTTP_REQUESTS, **http) == 6
    assert value(scraped, "tei_manager_multiplexer_processes") == 2
    assert value(scraped, "tei_manager_multiplexer_process_restarts_total") == 0
    from instances.models import Heartbeat

    wait_until(lambda: Heartbeat.objects.filter(name="multiplexer").exists(), 10, "heartbeat")


@pytest.mark.django_db(transaction=True)
def test_sigterm_lets_every_process_finish_its_calls_and_leaves_none(
    row: None, start: Callable[..., Multiplexer], tmp_path: Path
) -> None:
    multiplexer, used = two_processes(start, tmp_path, grace="60")
    pids = multiplexer.pids()
    with grpc.insecure_channel(f"127.0.0.1:{used['grpc']}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        answered: list[Any] = []
        served, resume = threading.Event(), threading.Event()

        def requests() -> Iterator[mux.EmbedRequest]:
            for i in range(20):
                if i == 5:
                    resume.wait(60)
                yield mux.EmbedRequest(
                    target=mux.Target(instance_name="minilm"),
                    request=tei_pb2.EmbedRequest(inputs=f"text {i}"),
                )

        def stream() -> None:
            for reply in stub.EmbedStream(requests(), timeout=120):
                answered.append(reply)
                if len(answered) == 5:
                    served.set()

        streamer = threading.Thread(target=stream)
        streamer.start()
        # The stream is under way (a process has answered its first five) before the signal.
        assert served.wait(60)
        multiplexer.process.send_signal(signal.SIGTERM)
        try:
            # Every process stops listening at once, and keeps the stream it serves.
            wait_until(lambda: refused(used["grpc"]) and refused(used["http"]), 30, "refusal")
        finally:
            resume.set()
        streamer.join(120)
        assert len(answered) == 20
    assert multiplexer.finish() == 0
    assert "finishing in-flight calls" in multiplexer.output
    assert multiplexer.output.rstrip().endswith("Done.")
    assert all(gone(pid) for pid in pids)


def refused(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.django_db(transaction=True)
def test_a_process_that_dies_is_replaced_and_its_counts_stay(
    row: None, start: Callable[..., Multiplexer], tmp_path: Path
) -> None:
    multiplexer, used = two_processes(start, tmp_path)
    pids = multiplexer.pids()
    before = serve_until_each_took_calls(used, tmp_path, pids)
    os.kill(pids[0], signal.SIGKILL)
    multiplexer.wait_for(rf"Multiplexer process {pids[0]} was killed by SIGKILL")
    new = int(multiplexer.wait_for(r"Multiplexer process (\d+) started").group(1))
    assert new not in pids and parent_of(new) == multiplexer.process.pid
    after = serve_until_each_took_calls(used, tmp_path, [new, pids[1]])
    scraped = scrape(used["metrics"])
    # The dead process's calls still count: the view never goes backwards.
    assert value(scraped, REQUESTS, instance="minilm", method="Embed") == before + after
    assert value(scraped, "tei_manager_multiplexer_processes") == 2
    assert value(scraped, "tei_manager_multiplexer_process_restarts_total") == 1
    # A parent that dies without a word (SIGKILL) leaves no process behind either.
    multiplexer.process.kill()
    wait_until(lambda: gone(new) and gone(pids[1]), 30, "orphaned processes to exit")


@pytest.mark.django_db(transaction=True)
def test_a_second_multiplexer_on_a_taken_port_fails_loudly(
    row: None, start: Callable[..., Multiplexer], tmp_path: Path
) -> None:
    first, used = two_processes(start, tmp_path)
    single_port = free_port()
    single = start("--port", str(single_port), "--metrics-port", "0")
    first.pids()
    single.wait_for("is now running")
    grpc_port, http_port = str(used["grpc"]), str(used["http"])
    attempts = {
        # the same gRPC port, with several processes and with one
        f"127.0.0.1:{grpc_port} (gRPC, TEI_MANAGER_GRPC_PORT)": (
            "--processes", "2", "--port", grpc_port, "--http-port", str(free_port()),
        ),
        f"127.0.0.1:{grpc_port}": ("--processes", "1", "--port", grpc_port),
        # the same HTTP port
        f"127.0.0.1:{http_port} (HTTP, TEI_MANAGER_HTTP_PORT)": (
            "--processes", "2", "--port", str(free_port()), "--http-port", http_port,
        ),
        # the port of a multiplexer of one process
        f"127.0.0.1:{single_port} (gRPC, TEI_MANAGER_GRPC_PORT)": (
            "--processes", "2", "--port", str(single_port),
        ),
    }  # fmt: skip
    for message, args in attempts.items():
        second = start("--metrics-port", "0", *args, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
        assert second.finish() != 0, second.output
        assert f"cannot listen on {message}" in second.output, second.output
        assert "Traceback" not in second.output and "is now running" not in second.output
    # The first ones never noticed.
    embed_once(used["grpc"])
    embed_over_http(used["http"])
    assert first.process.poll() is None and single.process.poll() is None


@pytest.mark.django_db(transaction=True)
def test_two_multiplexers_starting_at_once_cannot_both_take_a_port(
    row: None, start: Callable[..., Multiplexer], tmp_path: Path
) -> None:
    """The port test and the processes' binds are apart in time; the startup lock closes
    that gap. Here the test holds the lock, as a multiplexer starting would, while the
    other multiplexer's processes bind (SO_REUSEPORT, as ours do)."""
    port = free_port()
    held = startup_lock([port])
    second = start(
        "--processes", "2", "--port", str(port), "--metrics-port", "0",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )  # fmt: skip
    try:
        second.wait_for(f"Waiting for another multiplexer that is starting on port {port}")
        listener = reuse_port_listener(port)
    finally:
        for sock in held:
            sock.close()
    with listener:
        assert second.finish() != 0
    assert f"cannot listen on 127.0.0.1:{port} (gRPC" in second.output
    assert "is now running" not in second.output
