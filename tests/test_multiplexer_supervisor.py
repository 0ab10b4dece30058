"""`runmultiplexer --processes N`, the parts that need no server: the port checks and the
startup lock, the fork guard, each process's share of an instance's limits, the one
heartbeat writer, the setting; and the supervisor's start failures and back-off, driven
in a process of its own with a stand-in for the server (it forks only a process of one
thread, which a test process is not). tests/test_multiplexer_processes.py runs the real
thing."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from multiplexer.options import ServerOptions
from multiplexer.ports import PortTaken, claim_ports, startup_lock
from multiplexer.processes import (
    ProcessMetrics,
    StartError,
    Supervisor,
    ensure_one_thread,
    metrics_server,
)
from multiplexer.refresher import RoutingRefresher
from multiplexer.routing import Route, Router, RoutingTable
from multiplexer.wire import Target
from teimanager.config import ConfigError, load_config
from tests.conftest import ROOT, TEST_ENV
from tests.localtei_fixtures import free_port


def reuse_port_listener(port: int) -> socket.socket:
    """A listener like one of another multiplexer's processes: SO_REUSEPORT on."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


def test_claiming_a_port_fails_where_a_reuse_port_group_listens() -> None:
    port = free_port()
    with reuse_port_listener(port):
        with pytest.raises(PortTaken, match=rf"127\.0\.0\.1:{port} \(gRPC"):
            claim_ports(ServerOptions(host="127.0.0.1", port=port))
        with pytest.raises(PortTaken, match=rf"127\.0\.0\.1:{port} \(HTTP"):
            claim_ports(ServerOptions(host="127.0.0.1", port=free_port(), http_port=port))


def test_claiming_picks_the_port_every_process_binds_for_port_zero() -> None:
    claimed = claim_ports(ServerOptions(host="127.0.0.1", port=0, http_port=0))
    assert claimed.port > 0 and claimed.http_port is not None and claimed.http_port > 0
    assert claimed.reuse_port


def test_the_startup_lock_is_held_until_released() -> None:
    port = free_port()
    held = startup_lock([port])
    with pytest.raises(PortTaken, match=f"another multiplexer has been starting on port {port}"):
        startup_lock([port], timeout=0.3)
    for sock in held:
        sock.close()
    for sock in startup_lock([port], timeout=0.3):
        sock.close()


def test_a_taken_metrics_port_is_named() -> None:
    supervisor = Supervisor(lambda options, link: None, 2, ServerOptions(host="127.0.0.1"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartError, match=f"metrics on port {port} \\(TEI_MANAGER_MULTI"):
            metrics_server("127.0.0.1", port, ProcessMetrics(supervisor))


def test_it_refuses_to_fork_a_process_that_runs_threads() -> None:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="busy")
    thread.start()
    try:
        with pytest.raises(StartError, match="cannot fork"):
            ensure_one_thread()
    finally:
        stop.set()
        thread.join()


def test_each_process_admits_its_share_of_an_instance_s_limit_and_queue() -> None:
    async def gate_of(limit: int, queue_size: int, processes: int) -> tuple[int, int]:
        table = RoutingTable.build([Route("one", "m", "127.0.0.1:1", "running", limit)])
        router = Router(table, queue_size=queue_size, processes=processes)
        route = await router.acquire(Target(instance_name="one"), 1)
        gate = router.gates["one"]
        router.release(route)
        return gate.limit, gate.queue_size

    assert asyncio.run(gate_of(512, 1024, 1)) == (512, 1024)
    assert asyncio.run(gate_of(512, 1024, 3)) == (170, 342)  # 3 x 170 <= 512
    assert asyncio.run(gate_of(1, 0, 4)) == (1, 0)


@pytest.mark.django_db
def test_a_refresher_without_a_heartbeat_writes_none() -> None:
    from instances.models import Heartbeat

    RoutingRefresher(Router(), heartbeat_interval=None).refresh_once()
    assert not Heartbeat.objects.filter(name="multiplexer").exists()
    RoutingRefresher(Router()).refresh_once()
    assert Heartbeat.objects.filter(name="multiplexer").exists()


def test_processes_is_a_setting() -> None:
    assert load_config(env={"TEI_MANAGER_MULTIPLEXER_PROCESSES": "4"}).multiplexer_processes == 4
    with pytest.raises(ConfigError, match="TEI_MANAGER_MULTIPLEXER_PROCESSES"):
        load_config(env={"TEI_MANAGER_MULTIPLEXER_PROCESSES": "0"})


def test_several_processes_need_a_metrics_directory(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, prometheus_multiproc_dir="")
    with pytest.raises(CommandError, match="--processes 2 needs PROMETHEUS_MULTIPROC_DIR"):
        call_command("runmultiplexer", "--processes", "2", "--port", str(free_port()))
    with pytest.raises(CommandError, match="--processes must be at least 1"):
        call_command("runmultiplexer", "--processes", "0")


# The supervisor alone, in a process of its own (it forks only a process of one thread) ------

SUPERVISOR_SCRIPT = """
import os, signal, sys, time
import django

django.setup()
from multiplexer.options import ServerOptions
from multiplexer.processes import StartError, Supervisor

mode = sys.argv[1]


def serve(options, link):
    if mode == "fail" and not options.heartbeat:  # the second process
        raise StartError("the second process cannot start")
    link.ready("none")
    if mode == "fail":
        time.sleep(3600)  # until SIGTERM


supervisor = Supervisor(serve, 2, ServerOptions(host="127.0.0.1", port=0), out=print)
try:
    supervisor.start()
except StartError as exc:
    print("failed:", exc)
else:
    signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
    signal.alarm(4)
    supervisor.run()
    supervisor.stop(1.0)
print("pids:", " ".join(map(str, supervisor.pids_seen)), flush=True)
"""


def run_supervisor(mode: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_SCRIPT, mode],
        cwd=ROOT,
        env={**os.environ, **TEST_ENV},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_a_process_that_cannot_start_stops_them_all_with_its_reason() -> None:
    output = run_supervisor("fail")
    assert "failed: the second process cannot start" in output
    pids = [int(pid) for pid in output.split("pids:")[1].split()]
    assert len(pids) == 2 and all(gone(pid) for pid in pids)


def test_a_process_that_keeps_dying_young_is_restarted_ever_later() -> None:
    output = run_supervisor("exit")
    assert "exited with status 0; starting another in 1 s." in output
    assert "exited with status 0; starting another in 2 s." in output, output
    assert all(gone(int(pid)) for pid in output.split("pids:")[1].split())


def gone(pid: int) -> bool:
    """Exited (or a zombie nobody has reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"
