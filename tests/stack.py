"""The stack's processes as real subprocesses, for tests and benchmarks (no pytest here).

- `Service`: one long-running process started the way a supervisor starts it (a session
  of its own, output appended to a log file), with `kill_main()` (SIGKILL to its main
  process only, what an OOM kill or a crash does) and `kill()` (its whole process group).
- `CeleryWorker`, `CeleryBeat`, `Web` (gunicorn), `Multiplexer`, `Redis`: the parts.
- `Stack`: all of them on private ports, with a private SQLite file, log directory and
  Redis; a small REST client (`api`, `health`, `row`), a gRPC one (`embed`), and a census
  of the instance processes on this host (`census`).
- `wait_until(predicate)`, `instance_processes(port)`, `listener(port)`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import psutil

ROOT = Path(__file__).resolve().parent.parent
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
LOGPIPE = "instances.logpipe"


def wait_until(predicate: Callable[[], Any], timeout: float = 60, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(0.1)


class Service:
    """A process of the stack; `ready()` says when it serves."""

    marker = ""  # a line in its log that says it serves

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_file: Path):
        self.name = name
        self.command = command
        self.env = env
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, timeout: float = 60) -> Self:
        self.spawn()
        return self.wait_ready(timeout)

    def spawn(self) -> Self:
        self._offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = 60) -> Self:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_text()[-4000:]}")

    def ready(self) -> bool:
        return self.marker in self.new_output()

    def new_output(self) -> str:
        """What it wrote since its last start."""
        with contextlib.suppress(FileNotFoundError), self.log_file.open("rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")
        return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill_main(self) -> None:
        """SIGKILL its main process only: its children live on, as after an OOM kill."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL its whole process group (instances run in sessions of their own)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a warm shutdown); SIGKILL to the group after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


class CeleryWorker(Service):
    """`celery worker` serving one node (with an embedded beat when `schedule` is given)."""

    marker = " ready."

    def __init__(
        self,
        node: str,
        env: dict[str, str],
        log_file: Path,
        schedule: Path | None = None,
        concurrency: int = 2,
    ) -> None:
        command = [sys.executable, "-m", "celery", "-A", "teimanager", "worker"]
        if schedule is not None:
            command += ["-B", "--schedule", str(schedule)]
        command += [
            "--pool", "prefork", "--concurrency", str(concurrency),
            "--without-mingle", "--without-gossip", "--without-heartbeat",
            "--loglevel", "INFO", "--hostname", f"{node}@%h",
        ]  # fmt: skip
        super().__init__(f"worker {node}", command, env, log_file)
        self.node = node

    def pool_processes(self) -> list[int]:
        """The prefork pool processes: the main process's children that run Celery."""
        return [pid for pid in children(self.pid) if "celery" in " ".join(cmdline(pid))]


class CeleryBeat(Service):
    marker = "beat: Starting..."

    def __init__(self, env: dict[str, str], log_file: Path, schedule: Path) -> None:
        command = [sys.executable, "-m", "celery", "-A", "teimanager", "beat"]
        command += ["--schedule", str(schedule), "--loglevel", "INFO"]
        super().__init__("beat", command, env, log_file)


class Web(Service):
    """gunicorn, as the Procfile and the systemd unit run it."""

    def __init__(self, env: dict[str, str], log_file: Path, port: int) -> None:
        command = [sys.executable, "-m", "gunicorn", "teimanager.asgi"]
        command += ["--config", "python:teimanager.gunicorn_conf"]
        super().__init__("web", command, env, log_file)
        self.port = port

    def ready(self) -> bool:
        return http(f"http://127.0.0.1:{self.port}/health", timeout=5)[0] is not None


class Multiplexer(Service):
    marker = "is now running"

    def __init__(self, env: dict[str, str], log_file: Path, port: int) -> None:
        command = [sys.executable, "manage.py", "runmultiplexer", "--host", "127.0.0.1"]
        command += ["--port", str(port), "--metrics-port", "0"]
        super().__init__("multiplexer", command, env, log_file)
        self.port = port


class Redis(Service):
    marker = "Ready to accept connections"

    def __init__(self, log_file: Path, port: int) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(port)]
        command += ["--save", "", "--appendonly", "no"]
        super().__init__("redis", command, dict(os.environ), log_file)
        self.port = port


@dataclass(frozen=True)
class Census:
    """The instance processes of one stack, as this host sees them."""

    localtei: dict[int, set[int]]  # port -> live localtei pids serving it
    logpipes: set[int]  # live log pipes writing into the stack's log directory

    @property
    def pids(self) -> set[int]:
        return set().union(*self.localtei.values()) if self.localtei else set()


class Stack:
    """web, worker, beat, multiplexer and Redis on private ports, one SQLite file.

    Each part is a `Service`; a test kills and restarts them as a supervisor would. The
    config ticks every `health_interval` seconds. Instances run localtei.
    """

    def __init__(self, directory: Path, name: str, health_interval: int = 1) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node = f"{name}-node"
        self.db = self.dir / "state.sqlite3"
        self.log_dir = self.dir / "logs"
        self.log_dir.mkdir(exist_ok=True)
        # Instance ports: below the kernel's ephemeral range (32768-) and the suite's own
        # (tests/conftest.py, 20000-40000), so that no outgoing connection takes one while
        # its instance restarts.
        self.port_base = random.Random(name).randrange(10000, 20000, 100)
        self.api_port, self.grpc_port, self.http_port, self.redis_port = free_ports(4)
        config = self.dir / "tei-manager.toml"
        config.write_text(
            f"""
health_check_interval_secs = {health_interval}
startup_timeout_secs = 120
max_failures_before_restart = 3
graceful_shutdown_timeout_secs = 5
instance_port_start = {self.port_base}
instance_port_end = {self.port_base + 49}
prometheus_port_start = {self.port_base + 50}
prometheus_port_end = {self.port_base + 99}
"""
        )
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("TEI_", "CELERY_", "DJANGO_", "PROMETHEUS_"))
            and key not in ("DATABASE_URL", "SECRET_KEY")
        }
        self.env.update(
            DJANGO_SETTINGS_MODULE="teimanager.settings",
            TEI_MANAGER_CONFIG=str(config),
            TEI_MANAGER_STATE_FILE=str(self.db),
            TEI_MANAGER_LOG_DIR=str(self.log_dir),
            TEI_MANAGER_NODE=self.node,
            TEI_MANAGER_API_PORT=str(self.api_port),
            TEI_MANAGER_GRPC_PORT=str(self.grpc_port),
            TEI_MANAGER_HTTP_PORT=str(self.http_port),
            TEI_MANAGER_MULTIPLEXER_METRICS_PORT="0",
            CELERY_BROKER_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            CELERY_TASK_DEFAULT_QUEUE=f"{name}-tick",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            LOCALTEI_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "proto")]),
        )
        logs = self.dir / "services"
        logs.mkdir(exist_ok=True)
        self.redis = Redis(logs / "redis.log", self.redis_port)
        self.worker = CeleryWorker(self.node, self.env, logs / "worker.log")
        self.beat = CeleryBeat(self.env, logs / "beat.log", self.dir / "celerybeat-schedule")
        self.web = Web(self.env, logs / "web.log", self.api_port)
        self.multiplexer = Multiplexer(self.env, logs / "multiplexer.log", self.grpc_port)

    @property
    def services(self) -> list[Service]:
        return [self.redis, self.worker, self.beat, self.web, self.multiplexer]

    def up(self, timeout: float = 90) -> None:
        """Migrate, start every part (in parallel) and wait until each serves."""
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            cwd=ROOT, env=self.env, check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        self.redis.start(timeout)
        for service in self.services[1:]:
            service.spawn()
        for service in self.services[1:]:
            service.wait_ready(timeout)

    def down(self) -> None:
        """Stop every part (the worker stops its instances), then anything left over."""
        for service in (self.beat, self.web, self.multiplexer, self.worker):
            if service.running():
                service.stop()
        census = self.census()
        for pid in census.pids | census.logpipes:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        self.redis.stop()
        for service in self.services:
            with contextlib.suppress(Exception):
                service.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def tails(self, lines: int = 40) -> str:
        """The last lines each part logged, and the instances' logs: for a failure report."""
        files = [service.log_file for service in self.services]
        files += sorted(self.log_dir.glob("*.log"))
        out = []
        for path in files:
            text = path.read_text(errors="replace") if path.exists() else ""
            out.append(f"--- {path.name}\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(out)

    # What the operator sees ----------------------------------------------------------

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, timeout: float = 30
    ) -> tuple[int | None, Any]:
        """(status, JSON body) of a request to web; (None, reason) when it does not answer."""
        return http(f"http://127.0.0.1:{self.api_port}{path}", method, body, timeout)

    def health(self) -> tuple[int | None, Any]:
        return self.api("GET", "/health", timeout=10)

    def row(self, name: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/instances/{name}")
        assert status == 200, f"GET /instances/{name}: {status} {body}"
        return dict(body)

    def healthy(self) -> bool:
        return self.health()[0] == 200

    def embed(self, name: str, text: str = "fault", timeout: float = 10) -> int:
        """Embed `text` through the multiplexer; the vector's length."""
        import grpc
        from tei.v1 import tei_pb2
        from tei_multiplexer.v1 import multiplexer_pb2, multiplexer_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            reply = stub.Embed(
                multiplexer_pb2.EmbedRequest(
                    target=multiplexer_pb2.Target(instance_name=name),
                    request=tei_pb2.EmbedRequest(inputs=text),
                ),
                timeout=timeout,
            )
        return len(reply.embeddings)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement on the stack's database directly (what the API does not show,
        or a clean-up); committed."""
        with contextlib.closing(sqlite3.connect(self.db, timeout=30)) as db, db:
            return db.execute(sql, args).fetchall()

    # What runs on the host -------------------------------------------------------------

    def census(self) -> Census:
        ports = range(self.port_base, self.port_base + 50)
        localtei = {port: pids for port, pids in localtei_processes().items() if port in ports}
        log_dir = str(self.log_dir)
        logpipes = set()
        for proc in psutil.process_iter(["cmdline", "status"]):
            line = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or line[1:3] != ["-m", LOGPIPE]:
                continue
            if any(arg.startswith(log_dir) for arg in line):
                logpipes.add(proc.pid)
        return Census(localtei, logpipes)

    def settled(self, name: str) -> dict[str, Any] | None:
        """The row of `name` once it runs as exactly one process, the tracked one, which
        listens on its port, with one log pipe per instance process and no orphan left
        to kill; None until then."""
        row = self.row(name)
        if row["status"] != "running" or row["pid"] is None:
            return None
        census = self.census()
        tracked = {pid for (pid,) in self.query("SELECT pid FROM instances_instance") if pid}
        if census.localtei.get(row["port"]) != {row["pid"]} or census.pids != tracked:
            return None
        if listener(row["port"]) != row["pid"] or len(census.logpipes) != len(census.pids):
            return None
        if self.query("SELECT count(*) FROM instances_orphanprocess")[0][0]:
            return None
        return row


def http(
    url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 30
) -> tuple[int | None, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        return None, f"{type(exc).__name__}: {exc}"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports nothing listens on right now."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flag(line: Iterable[str], name: str) -> str | None:
    """The value after `name` in a command line."""
    return next((value for key, value in itertools.pairwise(line) if key == name), None)


def cmdline(pid: int) -> list[str]:
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def children(pid: int) -> list[int]:
    """The direct children of `pid` (from the kernel's list: cheaper than a process scan)."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def instance_processes(port: int) -> set[int]:
    """Live localtei processes serving `port` on this host."""
    return localtei_processes().get(port, set())


def localtei_processes() -> dict[int, set[int]]:
    """Live localtei processes on this host, by the port they serve."""
    found: dict[int, set[int]] = {}
    for proc in psutil.process_iter(["cmdline", "status"]):
        line = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or line[1:3] != ["-m", "localtei"]:
            continue
        port = flag(line, "--port")
        if port is not None and port.isdigit():
            found.setdefault(int(port), set()).add(proc.pid)
    return found


def listener(port: int) -> int | None:
    """The pid listening on `port`, if any."""
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.pid
    return None
