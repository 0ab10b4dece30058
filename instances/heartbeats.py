"""The heartbeats the Celery processes write themselves; instances/health.py judges them.

- `beat`: celery beat, each time it sends the reconcile tick;
- `worker.<node>`: each node's worker, from a thread of its main process (a bootstep), every
  WORKER_HEARTBEAT_SECS, for as long as that process lives; the same thread writes the
  node's row (nodes.Node: capacity and last_seen), which decides whether the node is up;
- `reconcile` is written by the tick itself (supervisor.reconcile_node) and `multiplexer`
  by the multiplexer's routing refresher.

The same worker thread samples its node's GPUs (NVML) every GPU_SAMPLE_SECS for the
admin's fleet chart.

Importable before Django is set up (teimanager/celery.py registers the bootstep): models
are imported where they are used. A failed write is logged, never raised: a heartbeat must
not stop the process it speaks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from typing import Any

from celery import bootsteps, signals

log = logging.getLogger(__name__)

BEAT = "beat"
RECONCILE = "reconcile"
MULTIPLEXER = "multiplexer"
WORKER_PREFIX = "worker."
WORKER_HEARTBEAT_SECS = 5.0
GPU_SAMPLE_SECS = 10.0
RECONCILE_TASK = "instances.tasks.reconcile"
_NAME_LENGTH = 64  # Heartbeat.name's max_length

# A fork (the worker's embedded beat, a pool process replaced) taken while a thread of the
# parent is inside SQLite hands the child a copy of SQLite's lock bookkeeping that no
# connection of the child will ever release: each write of the child then waits out the
# busy timeout and fails with "database is locked" (a beat that never ticks). So the
# heartbeat thread's database work and os.fork() exclude each other.
_NO_FORK = threading.Lock()
os.register_at_fork(
    before=_NO_FORK.acquire, after_in_parent=_NO_FORK.release, after_in_child=_NO_FORK.release
)


@contextlib.contextmanager
def no_fork() -> Any:
    """Hold off os.fork() in every thread of this process for the block's duration."""
    with _NO_FORK:
        yield


def worker_name(node: str) -> str:
    """`worker.<node>`, shortened with a digest where a long node name would not fit."""
    name = WORKER_PREFIX + node
    if len(name) <= _NAME_LENGTH:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:8]
    return f"{name[: _NAME_LENGTH - 9]}~{digest}"


def record(name: str) -> bool:
    """Write heartbeat `name` now; False (and a log line) when the database refused."""
    from django.db import close_old_connections

    from instances.models import Heartbeat

    try:
        close_old_connections()
        Heartbeat.beat(name)
    except Exception as exc:
        log.warning("cannot write the %s heartbeat: %s", name, exc)
        return False
    return True


def record_node(node: str) -> bool:
    """Write this node's row (nodes.Node: its capacity, seen now); False when refused."""
    from django.db import close_old_connections

    from nodes import registry

    try:
        close_old_connections()
        registry.register(node)
    except Exception as exc:
        log.warning("cannot write the row of node %s: %s", node, exc)
        return False
    return True


def sample_gpus(node: str) -> int:
    """Write one sample per GPU of this host; the number written (0: no GPU, or the
    database refused, which is logged)."""
    from instances import gpu
    from telemetry import series

    try:
        stats = gpu.stats()
        return series.record_gpus(series.aligned(time.time()), node, stats) if stats else 0
    except Exception as exc:
        log.warning("cannot write the GPU samples: %s", exc)
        return 0


@signals.after_task_publish.connect
def beat_sends_the_tick(sender: Any = None, **kwargs: Any) -> None:
    # Only beat sends the reconcile tick. Written once it is sent: a slow database must not
    # hold the tick back until it expires.
    if sender == RECONCILE_TASK:
        record(BEAT)


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Writes `worker.<node>` every WORKER_HEARTBEAT_SECS from the worker's main process.

    A thread of its own, not the worker's timer: a slow database write must not stall the
    loop that takes messages from the broker.
    """

    requires = {"celery.worker.components:Pool"}

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        from django.conf import settings

        name = worker_name(settings.NODE_NAME)
        self._thread = threading.Thread(
            target=self._run, args=(name, settings.NODE_NAME), name="worker-heartbeat", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, name: str, node: str) -> None:
        from django.db import connection

        next_sample = 0.0
        try:
            while True:
                with no_fork():
                    record(name)
                    record_node(node)
                    if time.monotonic() >= next_sample:
                        sample_gpus(node)
                        next_sample = time.monotonic() + GPU_SAMPLE_SECS - 1
                    # No connection held between beats: the pool forks while this runs.
                    connection.close()
                if self._stop.wait(WORKER_HEARTBEAT_SECS):
                    return
        finally:
            with no_fork():
                connection.close()
