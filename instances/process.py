"""Instance processes on this host: build the command, spawn, check, stop.

No shell anywhere: the command is a list (instances/launch.py builds it and the
environment). Each instance is started by its log pipe
(`python -m instances.logpipe`, see logpipe.py), which runs in a session of its own (so
the instance outlives a dying worker) and writes the instance's stdout and stderr to
`<log dir>/<name>.log`, rotated by size. The instance leads a process group of its own
in that session: a stop signals the group, and then waits for the log pipe to drain.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instances.launch import BASE_DIR, build_command, build_env
from instances.logs import log_path

if TYPE_CHECKING:
    from instances.models import Instance

LOGPIPE_MODULE = "instances.logpipe"
# How long the log pipe may take to start the instance (a Python start-up, on a busy host).
SPAWN_TIMEOUT_SECS = 30.0


@dataclass(frozen=True)
class Spawned:
    pid: int
    create_time: float


def spawn(
    instance: Instance,
    tei_binary_path: str,
    log_dir: Path,
    log_max_bytes: int = 0,
    log_backups: int = 0,
) -> Spawned:
    """Start the instance's process through its log pipe; raises OSError when the binary
    (or the log file) cannot be used, LaunchContractError when the row cannot be launched
    as it stands. Returns the instance's pid, not the log pipe's."""
    command = build_command(instance, tei_binary_path)
    log_dir.mkdir(parents=True, exist_ok=True)
    status_read, status_write = os.pipe()
    try:
        pipe = subprocess.Popen(
            [sys.executable, "-m", LOGPIPE_MODULE]
            + ["--max-bytes", str(log_max_bytes), "--backups", str(log_backups)]
            + ["--status-fd", str(status_write), str(log_path(log_dir, instance.name))]
            + ["--", *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=build_env(instance),
            cwd=BASE_DIR,
            start_new_session=True,
            close_fds=True,
            pass_fds=(status_write,),
        )
    finally:
        os.close(status_write)
    # The reaper (reap_children) collects the exit status, whichever pool process stops it;
    # marking the Popen done keeps subprocess from polling a pid that may be reused.
    pipe.returncode = 0
    try:
        pid = _read_launch_status(status_read, pipe.pid)
    finally:
        os.close(status_read)
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        # Gone already (the log pipe reaped it): a start time no process can have, so
        # that the pid reads as dead, not as whichever process gets it next.
        create_time = 0.0
    return Spawned(pid=pid, create_time=create_time)


def _read_launch_status(status: int, pipe_pid: int) -> int:
    """The instance's pid from the log pipe's status lines (see logpipe.py); OSError when
    the instance did not start."""
    deadline = time.monotonic() + SPAWN_TIMEOUT_SECS
    report = b""
    while chunk := _read_until(status, deadline):
        report += chunk
    pid = None
    for line in report.decode(errors="replace").splitlines():
        kind, *fields = line.split("\t")
        if kind == "error" and len(fields) == 3:
            number, filename, message = fields
            raise OSError(int(number) if number.isdigit() else 0, message, filename)
        if kind == "pid" and len(fields) == 1 and fields[0].isdigit():
            pid = int(fields[0])
    if pid is None:
        _signal_group(pipe_pid, signal.SIGKILL)
        raise OSError("the log pipe ended or hung before it started the instance")
    return pid


def _read_until(fd: int, deadline: float) -> bytes:
    """The next bytes from `fd`; empty at its end or at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
        return b""
    return os.read(fd, 4096)


def find_launched(instance: Instance, tei_binary_path: str) -> list[tuple[int, float]]:
    """Live processes on this host that run the instance's exact command (found by their
    command line, which holds the instance's ports): what a launch that died before saving
    its pid leaves behind."""
    command = build_command(instance, tei_binary_path)
    found = []
    for proc in psutil.process_iter(["cmdline", "create_time", "status"]):
        cmdline = proc.info["cmdline"] or []
        if (
            cmdline[-len(command) :] == command
            and cmdline[1:3] != ["-m", LOGPIPE_MODULE]
            and proc.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append((proc.pid, proc.info["create_time"]))
    return found


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
    """SIGTERM each process group, wait up to `grace_secs` for the instances to exit and
    their log pipes to write the last lines, then SIGKILL what is left."""
    live = [(pid, ct) for pid, ct in processes if pid and is_alive(pid, ct)]
    pipes = [pipe for pid, _ in live if (pipe := _log_pipe(pid)) is not None]
    for pid, _ in live:
        _signal_group(pid, signal.SIGTERM)
    waiting = live + pipes
    deadline = time.monotonic() + grace_secs
    while waiting and time.monotonic() < deadline:
        reap_children()
        waiting = [(pid, ct) for pid, ct in waiting if is_alive(pid, ct)]
        if waiting:
            time.sleep(0.05)
    for pid, _ in waiting:
        _signal_group(pid, signal.SIGKILL)
    for pid, ct in waiting:
        _wait_gone(pid, ct, 5.0)


def _log_pipe(pid: int) -> tuple[int, float] | None:
    """The log pipe of instance `pid`: the leader of its session, when that is not the
    instance itself (one started before log pipes) and not this process's own."""
    try:
        leader = os.getsid(pid)
        if leader in (pid, os.getsid(0)):
            return None
        return leader, psutil.Process(leader).create_time()
    except (OSError, psutil.Error):
        return None


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


def health_check(address: str, timeout: float, api_key: str = "") -> bool:
    """grpc.health.v1 Check answers SERVING, or (without a health service) tei.v1 Info
    answers; both carry the instance's own key (TEI checks it on Info)."""
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout, metadata=metadata
            )
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                return False
        from tei.v1 import tei_pb2, tei_pb2_grpc

        try:
            tei_pb2_grpc.InfoStub(channel).Info(
                tei_pb2.InfoRequest(), timeout=timeout, metadata=metadata
            )
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
