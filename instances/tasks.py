"""Celery tasks (thin: the work is in supervisor.py) and the worker's lifecycle hooks.

Instance tasks go to the queue of the instance's node (`node.<name>`), which only that
host's worker consumes; the beat tick goes to the default queue and fans out per node.
The tick only decides: the launches, stops and kills it asks for are enqueued here.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import shared_task, signals
from django.conf import settings
from django.db import connections
from django.db.models import Count

from instances import process, supervisor
from instances.models import Instance, OrphanProcess, Status
from nodes import failover
from telemetry import propagation, series, tracing
from telemetry.models import GpuSample, StatusSample

log = logging.getLogger(__name__)


# A start is watched every 0.25 s at first, then less often, up to once a second: a
# quick model is seen running at once, and a five-minute load costs ~300 checks, not 1200.
WATCH_START_FIRST_SECS, WATCH_START_MAX_SECS = 0.25, 1.0


@shared_task(name="instances.tasks.launch_instance", ignore_result=True)
def launch_instance(pk: int) -> None:
    # A child of the create, start or repair that asked for it, when tracing is on.
    parent = propagation.task_trace(launch_instance.request)
    with tracing.span("instance.launch", parent=parent) as span:
        if span is not None:
            name = Instance.objects.filter(pk=pk).values_list("name", flat=True).first()
            span.set_attribute(tracing.INSTANCE_ATTRIBUTE, name or f"#{pk}")
        supervisor.launch(pk)
        _watch_again(pk, WATCH_START_FIRST_SECS)


@shared_task(name="instances.tasks.watch_start", ignore_result=True)
def watch_start(pk: int, every: float = WATCH_START_FIRST_SECS) -> None:
    work = supervisor.watch_start(pk)
    if supervisor.Work(supervisor.WATCH, pk) in work:
        _watch_again(pk, min(2 * every, WATCH_START_MAX_SECS))
    dispatch(settings.NODE_NAME, work)


def _watch_again(pk: int, every: float) -> None:
    watch_start.apply_async(args=[pk, every], countdown=every, queue=_own_queue())


@shared_task(name="instances.tasks.stop_instance", ignore_result=True)
def stop_instance(pk: int) -> None:
    supervisor.stop(pk)


@shared_task(name="instances.tasks.kill_orphan", ignore_result=True)
def kill_orphan(pk: int) -> None:
    supervisor.kill_orphan(pk)


@shared_task(name="instances.tasks.reconcile", ignore_result=True)
def reconcile() -> None:
    """The beat tick: move failover instances off nodes that are down (nodes/failover.py),
    reconcile this node here, and every other node on its own queue."""
    for move in failover.fail_over():
        enqueue(launch_instance, move.new_node, [move.pk])
        if move.orphan is not None:
            enqueue(kill_orphan, move.old_node, [move.orphan])
    nodes = set(Instance.objects.values_list("node", flat=True).distinct())
    for node in sorted(nodes - {settings.NODE_NAME}):
        expires = float(settings.TEI.health_check_interval_secs)
        enqueue(reconcile_node, node, [node], expires=expires)
    reconcile_node(settings.NODE_NAME)


@shared_task(name="instances.tasks.reconcile_node", ignore_result=True)
def reconcile_node(node: str) -> None:
    dispatch(node, supervisor.reconcile_node(node))


@shared_task(name="instances.tasks.sample_fleet", ignore_result=True)
def sample_fleet() -> None:
    """Beat, every 10 s: how many instances are in each status (the admin's fleet chart);
    fleet samples past 24 hours go."""
    now = time.time()
    counts = dict(Instance.objects.values_list("status").annotate(n=Count("id")))
    series.record_statuses(series.aligned(now), {s: counts.get(s, 0) for s in Status.values})
    series.prune(StatusSample, now)
    series.prune(GpuSample, now)


def dispatch(node: str, work: list[supervisor.Work]) -> None:
    """Enqueue the launches, stops and kills that supervisor asked for on `node`."""
    tasks = {
        supervisor.LAUNCH: launch_instance,
        supervisor.STOP: stop_instance,
        supervisor.KILL_ORPHAN: kill_orphan,
    }
    for item in work:
        if item.action in tasks:
            enqueue(tasks[item.action], node, [item.pk], headers=dict(item.trace))


def node_queue(node: str) -> str:
    return f"node.{node}"


def _own_queue() -> str:
    return node_queue(settings.NODE_NAME)


def enqueue(task: Any, node: str, args: list[Any], **options: Any) -> None:
    """Send `task` to `node`'s worker. A broker outage is logged, not raised: the next
    reconcile tick does the work anyway."""
    try:
        task.apply_async(args=args, queue=node_queue(node), **options)
    except Exception as exc:
        log.warning("could not enqueue %s%s for node %s: %s", task.name, args, node, exc)


@signals.celeryd_after_setup.connect
def consume_node_queue(sender: Any, instance: Any, **kwargs: Any) -> None:
    instance.app.amqp.queues.select_add(node_queue(settings.NODE_NAME))


@signals.worker_process_init.connect
def reap_instance_processes(**kwargs: Any) -> None:
    # Instance processes are children of the pool process that launched them.
    process.start_reaper()


@signals.worker_ready.connect
def restore_instances(**kwargs: Any) -> None:
    node = settings.NODE_NAME
    for pk in supervisor.restore_node(node):
        enqueue(launch_instance, node, [pk])
    # Whatever this node's previous worker left to kill (its kill messages died with it).
    for pk in OrphanProcess.objects.filter(node=node).values_list("pk", flat=True):
        enqueue(kill_orphan, node, [pk])
    # The main process forks pool processes again later: no connection of it lives on.
    connections.close_all()


# Set once this worker is asked to stop (SIGTERM, SIGINT, SIGQUIT): only then does it stop
# its instances. A worker that ends on an error (celery's "Unrecoverable error", which a
# Redis restart can cause) was not asked: as after a SIGKILL, its instances keep serving
# and the worker started next adopts them.
_STOP_ASKED = threading.Event()


@signals.worker_shutting_down.connect
def stop_instances_when_asked(**kwargs: Any) -> None:
    _STOP_ASKED.set()
    _stop_instances()


@signals.worker_shutdown.connect
def stop_instances_left(**kwargs: Any) -> None:
    # Once more once the pool has stopped: a launch running at the signal may have spawned.
    if _STOP_ASKED.is_set():
        _stop_instances()


def _stop_instances() -> None:
    if settings.STOP_INSTANCES_ON_EXIT:
        # Fast: honcho and systemd kill a worker that takes long to exit.
        grace = min(float(settings.TEI.graceful_shutdown_timeout_secs), 3.0)
        supervisor.shutdown_node(settings.NODE_NAME, grace)
