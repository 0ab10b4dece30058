"""The heartbeats the Celery processes write themselves; instances/health.py judges them.

- `beat`: celery beat, each time it sends the reconcile tick;
- `worker.<node>`: each node's worker, from a thread of its main process (a bootstep), every
  WORKER_HEARTBEAT_SECS, for as long as that process lives;
- `reconcile` is written by the tick itself (supervisor.reconcile_node) and `multiplexer`
  by the multiplexer's routing refresher.

The same worker thread samples its node's GPUs (NVML) every GPU_SAMPLE_SECS for the
admin's fleet chart.

Importable before Django is set up (teimanager/celery.py registers the bootstep): models
are imported where they are used. A failed write is logged, never raised: a heartbeat must
not stop the process it speaks for.
"""

from __future__ import annotations

import hashlib
import logging
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
# The worker's start-up forks its pool processes and, with -B, the embedded beat. An
# SQLite write on this thread during a fork leaves the child with SQLite's per-process
# lock bookkeeping of a transaction it does not have: every write of the child then
# fails with "database is locked" (seen as a beat that stalls 30 s per tick). So the
# first heartbeat waits until the worker is ready, when those forks are done.
_READY = threading.Event()
READY_WAIT_SECS = 60.0


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


@signals.before_task_publish.connect
def beat_sends_the_tick(sender: Any = None, **kwargs: Any) -> None:
    # Only beat sends the reconcile tick.
    if sender == RECONCILE_TASK:
        record(BEAT)


@signals.worker_ready.connect
def worker_is_ready(**kwargs: Any) -> None:
    _READY.set()


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
        if not _READY.wait(READY_WAIT_SECS) and self._stop.is_set():
            return
        try:
            while True:
                record(name)
                if time.monotonic() >= next_sample:
                    sample_gpus(node)
                    next_sample = time.monotonic() + GPU_SAMPLE_SECS - 1
                # No connection held between beats: the pool forks while this runs.
                connection.close()
                if self._stop.wait(WORKER_HEARTBEAT_SECS):
                    return
        finally:
            connection.close()
