"""Instance processes on this host: spawn, check, stop, read the log.

No shell anywhere: the command is a list (instances/launch.py builds it and the
environment). Each process runs in its own session (so a signal reaches its whole group
and it outlives a dying worker), with stdout and stderr appended to `<log dir>/<name>.log`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instances.launch import BASE_DIR, build_command, build_env

if TYPE_CHECKING:
    from instances.models import Instance


@dataclass(frozen=True)
class Spawned:
    pid: int
    create_time: float


def spawn(instance: Instance, tei_binary_path: str, log_dir: Path) -> Spawned:
    """Start the instance's process; raises OSError when the binary cannot be executed,
    LaunchContractError when the row cannot be launched as it stands."""
    command = build_command(instance, tei_binary_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path(log_dir, instance.name), "ab", buffering=0) as log:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"--- {stamp} tei-manager: starting {' '.join(command)}\n".encode())
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=build_env(instance),
            cwd=BASE_DIR,
            start_new_session=True,
            close_fds=True,
        )
    # The reaper (reap_children) collects the exit status, whichever pool process stops it;
    # marking the Popen done keeps subprocess from polling a pid that may be reused.
    child.returncode = 0
    return Spawned(pid=child.pid, create_time=psutil.Process(child.pid).create_time())


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """True when `pid` is a live (not zombie) process started at `create_time`."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.05:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def terminate(pid: int | None, create_time: float | None, grace_secs: float) -> None:
    """SIGTERM the process group, wait up to `grace_secs`, then SIGKILL it."""
    terminate_many([(pid, create_time)], grace_secs)


def terminate_many(processes: list[tuple[int | None, float | None]], grace_secs: float) -> None:
    live = [(pid, ct) for pid, ct in processes if pid and is_alive(pid, ct)]
    for pid, _ in live:
        _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_secs
    while live and time.monotonic() < deadline:
        reap_children()
        live = [(pid, ct) for pid, ct in live if is_alive(pid, ct)]
        if live:
            time.sleep(0.05)
    for pid, _ in live:
        _signal_group(pid, signal.SIGKILL)
    for pid, ct in live:
        _wait_gone(pid, ct, 5.0)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        # A process that is not a group leader (adopted from elsewhere) still gets it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pid: int, create_time: float | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and is_alive(pid, create_time):
        reap_children()
        time.sleep(0.02)
    reap_children()


def reap_children() -> None:
    """Collect every exited child of this process, so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def start_reaper(interval: float = 0.5) -> None:
    """Reap exited instance processes in the background (a Celery pool process calls it)."""

    def loop() -> None:
        while True:
            reap_children()
            time.sleep(interval)

    threading.Thread(target=loop, name="instance-reaper", daemon=True).start()


def health_check(address: str, timeout: float) -> bool:
    """grpc.health.v1 Check answers SERVING, or (without a health service) tei.v1 Info answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return False
        from tei.v1 import tei_pb2, tei_pb2_grpc

        try:
            tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest(), timeout=timeout)
            return True
        except grpc.RpcError:
            return False


def port_is_free(port: int) -> bool:
    """True when nothing on this host listens on `port`, on any address.

    An instance binds one address (TEI_MANAGER_INSTANCE_BIND), but a listener on any
    other address of the host, or on the wildcard, may hold the same port: binding the
    wildcard addresses fails for every one of them, so none is handed out twice.
    """
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
        except OSError:
            return False
        finally:
            sock.close()
    return True


def log_path(log_dir: Path, name: str) -> Path:
    return log_dir / f"{name}.log"


def tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return list(deque(text.splitlines(), maxlen=lines))


def read_lines(path: Path) -> list[str]:
    try:
        with path.open("rb") as fh:
            return fh.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
