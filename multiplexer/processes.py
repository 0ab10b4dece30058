"""`runmultiplexer --processes N`: N server processes on the same ports, one parent that
keeps them running.

Forking. grpcio cannot be carried across fork() (grpc/grpc#16001): its core starts threads
and polling state on first use, and a forked copy of them deadlocks. So the parent forks
before any gRPC object exists, before the server module is even imported (pyarrow starts
threads at import), and stays a process of one thread that opens no database connection:
every later fork, of a process that replaces one that died, is as clean as the first. Each
process then builds its own server, routing table and refresher; the first one (slot 0)
also writes the `multiplexer` heartbeat, since one sign of life is enough and its parent
replaces it within seconds when it dies.

Sharing the ports: multiplexer/ports.py. Each process binds them with SO_REUSEPORT; the
parent first proves them free, under a startup lock.

Metrics. The processes write their series to PROMETHEUS_MULTIPROC_DIR; the parent serves
the sum over the files of its processes (the running ones and those that died: their
counters still count) on the metrics port, with the number of processes running and
restarted. Other processes writing to the same directory (web, in `make run`) stay out of it.

Supervision. A process that exits is started again: at once if it had served for a while,
after 1, 2, 4… (at most 30) seconds if it keeps dying young. A process that cannot start
(a port another program took meanwhile) stops the whole multiplexer with its message, as
gunicorn does. SIGTERM or SIGINT: every process gets SIGTERM, finishes its calls within the
grace period, and is killed if it has not exited some seconds after it.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.db import connections
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from multiplexer.options import ServerOptions
from multiplexer.ports import PortTaken, claim_ports, startup_lock

START_TIMEOUT_SECS = 60.0
STOP_MARGIN_SECS = 5.0  # past the grace period, before SIGKILL
YOUNG_SECS = 10.0  # a process that dies younger than this is restarted after a back-off
MAX_BACKOFF_SECS = 30.0
SCRAPE_TIMEOUT_SECS = 5.0


class StartError(Exception):
    """The multiplexer (or one of its processes) cannot start; the message says why."""


@dataclass(frozen=True)
class Link:
    """What a forked process knows of its parent: how to say it listens, whom to outlive."""

    parent: int
    pipe: int

    def ready(self, loop_kind: str) -> None:
        os.write(self.pipe, f"ready {loop_kind}".encode())

    async def until_orphaned(self, stop: asyncio.Event, interval: float = 1.0) -> None:
        """Set `stop` once the parent is gone (a parent killed by SIGKILL cannot say so)."""
        while not stop.is_set():
            if os.getppid() != self.parent:
                stop.set()
                return
            await asyncio.sleep(interval)


# Serve in this process until SIGTERM/SIGINT: call `link.ready(loop kind)` once listening,
# or raise StartError before that.
Serve = Callable[[ServerOptions, Link], None]


@dataclass
class Process:
    slot: int
    pid: int
    started: float
    pipe: int | None  # read end: the process writes "ready <loop>" or "error <message>"
    ready: bool = False
    error: str = ""


class Supervisor:
    """Forks `count` processes that each run `serve`, keeps them running, stops them.

    `start()` returns once all of them listen (or raises StartError); `run()` supervises
    until SIGTERM or SIGINT; `stop(grace)` ends them. The parent serves the metrics.
    """

    def __init__(
        self,
        serve: Serve,
        count: int,
        options: ServerOptions,
        *,
        metrics_port: int = 0,
        metrics_dir: str = "",
        out: Callable[[str], None] = print,
    ) -> None:
        self.serve = serve
        self.count = count
        self.options = options
        self.metrics_port = metrics_port
        self.metrics_dir = metrics_dir
        self.out = out
        self.loop_kind = ""
        self.restarts = 0
        self.started = False  # every first process listened
        self.stopping = False
        self.failure = ""
        self.processes: dict[int, Process] = {}  # by slot
        self.pids_seen: list[int] = []
        self._due: dict[int, float] = {}  # slot -> when to start it again
        self._young_exits: dict[int, int] = {}
        self._selector = selectors.DefaultSelector()
        self._locks: list[socket.socket] = []
        self._metrics: WSGIServer | None = None
        self._wake_read, self._wake_write = socket.socketpair()
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup_fd = -1

    # The parent ---------------------------------------------------------------------

    def start(self) -> list[int]:
        """Claim the ports, fork the processes, return their pids once all listen."""
        self._catch_signals()
        try:
            ports = [self.options.port]
            if self.options.http_port is not None:
                ports.append(self.options.http_port)
            try:
                self._locks = startup_lock(ports, on_wait=self.out)
                self.options = claim_ports(self.options)
            except PortTaken as exc:
                raise StartError(str(exc)) from None
            if self.metrics_port:
                self._metrics = metrics_server(
                    self.options.host, self.metrics_port, ProcessMetrics(self)
                )
                self._selector.register(self._metrics, selectors.EVENT_READ, self._scrape)
            for slot in range(self.count):
                self._spawn(slot)
            self._wait_until_ready()
            self.started = True
        except BaseException:
            self.stop(grace=1.0)
            raise
        finally:
            for lock in self._locks:
                lock.close()
            self._locks = []
        return [process.pid for process in self.processes.values()]

    def run(self) -> None:
        """Keep the processes running until SIGTERM or SIGINT (or one fails to start)."""
        while not self.stopping:
            now = time.monotonic()
            timeout = min((due - now for due in self._due.values()), default=1.0)
            self._step(max(0.0, min(timeout, 1.0)))
            self._restart_due()
            self._kill_stuck_starts()

    def stop(self, grace: float) -> None:
        """SIGTERM every process, SIGKILL those still there `grace` + a margin later."""
        self.stopping = True
        self._due.clear()
        for process in self.processes.values():
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace + STOP_MARGIN_SECS
        while self.processes and time.monotonic() < deadline:
            self._step(min(0.5, max(0.0, deadline - time.monotonic())))
        for process in list(self.processes.values()):
            with suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            try:
                _, status = os.waitpid(process.pid, 0)
            except ChildProcessError:
                status = 0
            self._ended(process, status)
        self._close()

    def _step(self, timeout: float) -> None:
        for key, _ in self._selector.select(timeout):
            key.data(key.fileobj)
        self._reap()

    def _spawn(self, slot: int) -> int:
        ensure_one_thread()
        connections.close_all()  # a forked copy of a database connection is shared by both
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            self._child(slot, write_end, parent)  # never returns
        os.close(write_end)
        process = Process(slot, pid, time.monotonic(), read_end)
        self.processes[slot] = process
        self.pids_seen.append(pid)
        self._selector.register(read_end, selectors.EVENT_READ, self._read_pipe)
        return pid

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECS
        while not self.stopping and not all(p.ready for p in self.processes.values()):
            if self.failure:
                raise StartError(self.failure)
            if time.monotonic() > deadline:
                raise StartError(
                    f"the multiplexer's processes did not start within {START_TIMEOUT_SECS:g} s"
                )
            self._step(0.5)
        if self.failure:
            raise StartError(self.failure)

    def _read_pipe(self, fd: int) -> None:
        """A process's one message (or the end of its pipe): then the pipe is done."""
        message = os.read(fd, 65536).decode(errors="replace").strip()
        self._selector.unregister(fd)
        os.close(fd)
        process = next((p for p in self.processes.values() if p.pipe == fd), None)
        if process is None:
            return
        process.pipe = None
        if message.startswith("ready"):
            process.ready = True
            self.loop_kind = message.removeprefix("ready").strip()
        elif message.startswith("error"):
            process.error = message.removeprefix("error").strip()

    def _reap(self) -> None:
        for process in list(self.processes.values()):
            try:
                pid, status = os.waitpid(process.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = process.pid, 0
            if pid:
                self._ended(process, status)

    def _ended(self, process: Process, status: int) -> None:
        if process.pipe is not None:
            with suppress(OSError):  # the process may have said something before it died
                self._read_pipe(process.pipe)
        self.processes.pop(process.slot, None)
        if self.metrics_dir:
            mark_process_dead(process.pid, self.metrics_dir)
        if self.stopping:
            return
        if process.error or not (process.ready or self.started):
            # It could not start (a port another program took, a certificate gone): so
            # would the next one.
            self.failure = process.error or (
                f"a multiplexer process {describe_exit(status)} before it listened"
            )
            self.stopping = True
            return
        lived = time.monotonic() - process.started
        young = self._young_exits.get(process.slot, 0) + 1 if lived < YOUNG_SECS else 0
        self._young_exits[process.slot] = young
        delay = 0.0 if young == 0 else min(2.0 ** (young - 1), MAX_BACKOFF_SECS)
        self._due[process.slot] = time.monotonic() + delay
        later = f" in {delay:g} s" if delay else ""
        self.out(
            f"Multiplexer process {process.pid} {describe_exit(status)}; starting another{later}."
        )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for slot, due in list(self._due.items()):
            if due <= now and not self.stopping:
                del self._due[slot]
                self.restarts += 1
                self.out(f"Multiplexer process {self._spawn(slot)} started.")

    def _kill_stuck_starts(self) -> None:
        now = time.monotonic()
        for process in self.processes.values():
            if not process.ready and now - process.started > START_TIMEOUT_SECS:
                with suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)

    def _scrape(self, server: WSGIServer) -> None:
        server.handle_request()  # timeout 0: it is readable, answer this one request

    def _catch_signals(self) -> None:
        self._wake_read.setblocking(False)
        self._wake_write.setblocking(False)
        # A signal handler runs between bytecodes, and select() resumes after it (PEP 475):
        # the wake-up fd is what makes select() return at once.
        self._old_wakeup_fd = signal.set_wakeup_fd(
            self._wake_write.fileno(), warn_on_full_buffer=False
        )
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._drain_wakeups)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True

    def _drain_wakeups(self, sock: socket.socket) -> None:
        with suppress(BlockingIOError):
            while sock.recv(4096):
                pass

    def _close(self) -> None:
        if self._wake_read.fileno() == -1:
            return  # closed already
        if self._old_handlers:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            for signum, handler in self._old_handlers.items():
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self._old_handlers = {}
        if self._metrics is not None:
            self._metrics.server_close()
            self._metrics = None
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    # A forked process ----------------------------------------------------------------

    def _child(self, slot: int, pipe: int, parent: int) -> None:
        code = 1
        try:
            self._leave_the_parent_s_things()
            forget_stale_metrics(self.metrics_dir, os.getpid(), self.pids_seen)
            self.serve(replace(self.options, heartbeat=slot == 0), Link(parent, pipe))
            code = 0
        except StartError as exc:
            with suppress(OSError):
                os.write(pipe, f"error {exc}".encode()[:4000])
            code = 3
        except BaseException:
            traceback.print_exc()
        finally:
            with suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _leave_the_parent_s_things(self) -> None:
        """Close what the fork copied of the parent: its sockets and pipes (a copy would
        keep the metrics port or a startup lock bound after the parent is gone), its signal
        handlers."""
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)  # the server's loop installs its own
        for process in self.processes.values():
            if process.pipe is not None:
                os.close(process.pipe)
        for lock in self._locks:
            lock.close()
        if self._metrics is not None:
            self._metrics.socket.close()
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()


def ensure_one_thread() -> None:
    """Refuse to fork a process that runs threads: a forked copy of a lock another thread
    held (grpcio's, pyarrow's, an allocator's) stays locked forever in the child."""
    names = thread_names()
    if len(names) > 1:
        raise StartError(
            f"cannot fork the multiplexer's processes: this process runs {len(names)} threads "
            f"({', '.join(names)}); nothing may start one before the fork"
        )


def thread_names() -> list[str]:
    """The names of this process's threads, those of C libraries included (Linux)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        import threading

        return [thread.name for thread in threading.enumerate()]
    names = []
    for task in tasks.iterdir():
        with suppress(OSError):
            names.append((task / "comm").read_text().strip())
    return names


def describe_exit(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


# Metrics -----------------------------------------------------------------------------


class ProcessMetrics(Collector):
    """The multiplexer's series summed over its processes, and the supervisor's own."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        supervisor = self.supervisor
        yield from MultiProcessCollector.merge(
            process_files(supervisor.metrics_dir, supervisor.pids_seen), accumulate=True
        )
        yield GaugeMetricFamily(
            "tei_manager_multiplexer_processes",
            "Server processes of the multiplexer running now.",
            value=len(supervisor.processes),
        )
        yield CounterMetricFamily(
            "tei_manager_multiplexer_process_restarts",
            "Server processes of the multiplexer started again after one exited.",
            value=supervisor.restarts,
        )


def process_files(directory: str, pids: Iterable[int]) -> list[str]:
    """The metric files of these processes in a PROMETHEUS_MULTIPROC_DIR."""
    if not directory:
        return []
    return [str(path) for pid in pids for path in Path(directory).glob(f"*_{pid}.db")]


def forget_stale_metrics(directory: str, pid: int, pids_seen: list[int]) -> None:
    """A new process's pid may be that of a process of an earlier run: its files would
    carry that run's counts on. (A pid that died in this run keeps counting: same series.)"""
    if pid not in pids_seen:
        for path in process_files(directory, [pid]):
            with suppress(FileNotFoundError):
                os.remove(path)


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_SECS  # a stalled scraper holds the supervisor up no longer

    def log_message(self, format: str, *args: object) -> None:
        pass


def metrics_server(host: str, port: int, collector: ProcessMetrics) -> WSGIServer:
    """Prometheus' exposition on host:port, answered by the supervisor's own loop."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(WSGIServer):
        address_family = family

    try:
        server = make_server(
            host, port, make_wsgi_app(registry), server_class=Server, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise StartError(
            f"cannot serve metrics on port {port} (TEI_MANAGER_MULTIPLEXER_METRICS_PORT): {exc}"
        ) from None
    server.timeout = 0
    return server
