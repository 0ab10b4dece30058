"""The worker side of the lifecycle: launch, stop, health-check and repair the processes
of one node. Celery tasks call these; each step is a compare-and-set on the row, so a
duplicate or late message does nothing harmful.

A launch (1) retires the process the row still records (terminates it, then forgets its
pid), (2) claims the row, pending -> starting, with a fresh `launch_token`, (3) spawns,
(4) saves the pid where the row is still starting under that token. A restart, stop or
delete between (2) and (4) changes the row, so the save fails and the launch kills what
it spawned: a row never loses track of a live process, and no process outlives a launch
that lost its claim. Between (2) and (4) the row is starting without a pid, for as long
as a spawn takes; longer than LAUNCH_LOST_SECS means the launch died with its worker.

The reconcile tick decides (every change a compare-and-set) and returns the work to do
(`Work`); tasks.py enqueues it. The tick never waits for a process.
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from instances import logs, process
from instances.launch import LaunchContractError, binary_command
from instances.models import DesiredState, Heartbeat, Instance, OrphanProcess, Status
from telemetry import tracing

log = logging.getLogger(__name__)

LOG_LINES_IN_ERROR = 10
HEALTH_TIMEOUT_SECS = 2.0
MAX_BACKOFF_SECS = 300
# A spawn takes well under a second; a starting row without a pid this long after its
# claim was left by a worker that died mid-launch.
LAUNCH_LOST_SECS = 5.0

LAUNCH, STOP, KILL_ORPHAN, WATCH = "launch", "stop", "kill_orphan", "watch"


@dataclass(frozen=True)
class Work:
    """A task to enqueue: `action` (LAUNCH, STOP, KILL_ORPHAN, WATCH) on the row `pk`;
    `trace`: the W3C context of the decision (a repair's span), carried by the task."""

    action: str
    pk: int
    trace: tuple[tuple[str, str], ...] = field(default=(), compare=False)


def launch(pk: int) -> None:
    """Start the process of a `pending` instance (stopping a previous one first)."""
    instance = _own(pk).filter(status=Status.PENDING).first()
    if instance is None or instance.desired_state != DesiredState.RUNNING:
        return
    if instance.pid is not None and not _retire(instance):
        return
    if instance.next_restart_at and instance.next_restart_at > timezone.now():
        return  # backing off: a later reconcile tick launches it
    claimed = instance.transition(
        [Status.PENDING],
        Status.STARTING,
        same_process=True,
        launch_token=uuid.uuid4().hex,
        started_at=timezone.now(),
    )
    if not claimed:
        return  # another launch, a stop or a delete got there first
    config = settings.TEI
    try:
        spawned = process.spawn(
            instance,
            config.tei_binary_path,
            settings.LOG_DIR,
            config.instance_log_max_bytes,
            config.instance_log_backups,
        )
    except LaunchContractError as exc:
        instance.transition(
            [Status.STARTING], Status.FAILED, same_process=True, last_error=str(exc)
        )
        return
    except OSError as exc:
        command = binary_command(config.tei_binary_path)[0]
        instance.transition(
            [Status.STARTING],
            Status.FAILED,
            same_process=True,
            last_error=f"cannot run {command}: {exc}",
        )
        return
    saved = instance.transition(
        [Status.STARTING],
        Status.STARTING,
        same_process=True,
        pid=spawned.pid,
        process_started_at=spawned.create_time,
        next_restart_at=None,
    )
    if saved:
        log.info("instance %s: started pid %s", instance.name, spawned.pid)
    else:  # restarted, stopped or deleted while it was being spawned: nobody's process
        process.terminate(spawned.pid, spawned.create_time, _grace())
        log.info("instance %s: launch superseded, pid %s stopped", instance.name, spawned.pid)


def watch_start(pk: int) -> list[Work]:
    """Check a starting instance once, so that `running` does not wait for the next beat
    tick. WATCH among the work while it is still starting and worth another look."""
    instance = _own(pk).filter(status=Status.STARTING).first()
    if instance is None:
        return []
    alive = process.is_alive(instance.pid, instance.process_started_at)
    healthy = alive and process.health_check(
        instance.address, HEALTH_TIMEOUT_SECS, instance.api_key
    )
    work = _converge_starting(instance, alive, healthy)
    return work + [Work(WATCH, pk)] if instance.status == Status.STARTING else work


def stop(pk: int) -> None:
    """Stop the process of a `stopping` instance; start it again if that is wanted now."""
    instance = _own(pk).filter(status=Status.STOPPING).first()
    if instance is None:
        return
    process.terminate(instance.pid, instance.process_started_at, _grace())
    if not instance.transition([Status.STOPPING], Status.STOPPED, same_process=True, pid=None):
        return
    instance.refresh_from_db()
    if instance.desired_state == DesiredState.RUNNING and instance.transition(
        [Status.STOPPED], Status.PENDING
    ):
        launch(pk)


def kill_orphan(pk: int) -> None:
    """Stop a process that no row tracks any more (its instance was deleted, or failed)."""
    orphan = OrphanProcess.objects.filter(pk=pk).first()
    if orphan is not None:
        process.terminate(orphan.pid, orphan.process_started_at, _grace())
        OrphanProcess.objects.filter(pk=orphan.pk).delete()
        log.info("instance %s: process %s stopped", orphan.name, orphan.pid)


def reconcile_node(node: str) -> list[Work]:
    """One tick: decide how every instance of `node` converges to its desired state."""
    Heartbeat.beat("reconcile")
    process.reap_children()
    # A kill that should long be done: its message was lost, or its worker died.
    overdue = timezone.now() - timedelta(seconds=2 * _grace() + _interval())
    work = [
        Work(KILL_ORPHAN, pk)
        for pk in OrphanProcess.objects.filter(node=node, created_at__lt=overdue).values_list(
            "pk", flat=True
        )
    ]
    instances = list(
        Instance.objects.filter(node=node)
        .exclude(status=Status.FAILED)
        .exclude(status=Status.STOPPED, desired_state=DesiredState.STOPPED)
    )
    alive = {i.pk: process.is_alive(i.pid, i.process_started_at) for i in instances}
    to_check = [
        i for i in instances if i.status in (Status.STARTING, Status.RUNNING) and alive[i.pk]
    ]
    healthy = _check_health(to_check)
    now = timezone.now()
    passed = [
        i.pk
        for i in to_check
        if healthy[i.pk] and i.status == Status.RUNNING and i.desired_state == DesiredState.RUNNING
    ]
    if passed:
        Instance.objects.filter(pk__in=passed, status=Status.RUNNING).update(
            last_health_check=now, health_check_failures=0
        )
        work += stop_idle([i for i in to_check if i.pk in passed], now)
    for instance in instances:
        if instance.pk in passed:
            continue
        try:
            work += reconcile_instance(
                instance, alive[instance.pk], healthy.get(instance.pk, False)
            )
        except Exception:
            log.exception("instance %s: reconcile failed", instance.name)
    return work


def stop_idle(instances: list[Instance], now: datetime) -> list[Work]:
    """Stop the running instances with an idle timeout that got no call for that long
    (since their last call, or their start). The row stays: the next call for an
    on-demand model starts it again."""
    work = []
    for instance in instances:
        if not instance.idle_timeout_secs:
            continue
        started = instance.started_at or instance.created_at
        since = max(started, instance.last_call_at) if instance.last_call_at else started
        idle = (now - since).total_seconds()
        if idle < instance.idle_timeout_secs:
            continue
        if instance.transition(
            [Status.RUNNING], Status.STOPPING, desired_state=DesiredState.STOPPED
        ):
            log.info("instance %s: stopped after %.0f s without a call", instance.name, idle)
            work.append(Work(STOP, instance.pk))
    return work


def reconcile_instance(instance: Instance, alive: bool, healthy: bool) -> list[Work]:
    if instance.desired_state == DesiredState.STOPPED:
        if instance.status in Status.active():
            # The stop message was lost, or a live process was adopted that should not run.
            if instance.transition(Status.active(), Status.STOPPING):
                return [Work(STOP, instance.pk)]
        elif instance.status == Status.STOPPING:
            return _converge_stopping(instance, alive)
        return []
    if instance.status == Status.PENDING:
        return _converge_pending(instance)
    if instance.status == Status.STOPPED:
        if instance.transition([Status.STOPPED], Status.PENDING):
            return [Work(LAUNCH, instance.pk)]
    elif instance.status == Status.STOPPING:
        return _converge_stopping(instance, alive)
    elif instance.status == Status.STARTING:
        return _converge_starting(instance, alive, healthy)
    elif instance.status == Status.RUNNING:
        return _converge_running(instance, alive, healthy)
    return []


def restore_node(node: str) -> list[int]:
    """After the manager (re)starts: adopt live processes, restore or park dead ones.

    Returns the pks to launch. Runs in the worker's main process, so it never spawns.
    """
    to_launch = []
    on_node = Instance.objects.filter(node=node, status__in=[*Status.active(), Status.STOPPING])
    for instance in on_node:
        if process.is_alive(instance.pid, instance.process_started_at):
            log.info("instance %s: adopted live pid %s", instance.name, instance.pid)
            continue
        # A launch cut short may have spawned a process and not saved its pid.
        strays = []
        if instance.status == Status.STARTING and instance.pid is None:
            strays = process.find_launched(instance, settings.TEI.tei_binary_path)
        if instance.desired_state == DesiredState.STOPPED:
            instance.transition([instance.status], Status.STOPPED, pid=None)
        elif settings.TEI.auto_restore_on_restart:
            # The launch stops the process left behind before it starts a new one.
            left_pid, left_started_at = strays.pop(0) if strays else (None, None)
            ran = instance.pid is not None
            if instance.transition(
                [instance.status],
                Status.PENDING,
                pid=left_pid,
                process_started_at=left_started_at,
                next_restart_at=None,
                restarts=F("restarts") + int(ran),
            ):
                to_launch.append(instance.pk)
        else:
            instance.transition(
                [instance.status],
                Status.STOPPED,
                pid=None,
                desired_state=DesiredState.STOPPED,
                last_error="process gone after a manager restart (auto_restore_on_restart is off)",
            )
        for pid, started_at in strays:  # stopped by the kills tasks.py enqueues at start-up
            _record_orphan(instance, pid, started_at)
    return to_launch


def shutdown_node(node: str, grace_secs: float) -> None:
    """Stop every process of `node` (the worker is exiting); the desired state is kept."""
    instances = list(Instance.objects.filter(node=node).exclude(pid=None))
    orphans = list(OrphanProcess.objects.filter(node=node))
    process.terminate_many(
        [(i.pid, i.process_started_at) for i in instances]
        + [(o.pid, o.process_started_at) for o in orphans],
        grace_secs,
    )
    OrphanProcess.objects.filter(pk__in=[o.pk for o in orphans]).delete()
    for instance in instances:
        instance.transition(Status.values, Status.STOPPED, same_process=True, pid=None)
    if instances:
        log.info("stopped %d instance(s) of node %s", len(instances), node)


def _own(pk: int) -> QuerySet[Instance]:
    """The row `pk` while it belongs to this worker's node: a message sent before its
    instance moved to another node (failover, nodes/failover.py) finds nothing."""
    return Instance.objects.filter(pk=pk, node=settings.NODE_NAME)


def _retire(instance: Instance) -> bool:
    """Stop the process a pending row still records and forget it; False when the row
    changed meanwhile (a stop, a delete, or another launch that retired it first)."""
    process.terminate(instance.pid, instance.process_started_at, _grace())
    return instance.transition([Status.PENDING], Status.PENDING, same_process=True, pid=None)


def _converge_pending(instance: Instance) -> list[Work]:
    if instance.next_restart_at and instance.next_restart_at > timezone.now():
        return []  # backing off
    if _seconds_since(instance.updated_at) < _interval():
        return []  # its launch message is on its way
    return [Work(LAUNCH, instance.pk)]


def _converge_stopping(instance: Instance, alive: bool) -> list[Work]:
    if not alive:
        instance.transition([Status.STOPPING], Status.STOPPED, same_process=True, pid=None)
    elif _seconds_since(instance.updated_at) > 2 * _grace():
        return [Work(STOP, instance.pk)]  # the stop task should have finished long ago
    return []


def _converge_starting(instance: Instance, alive: bool, healthy: bool) -> list[Work]:
    if alive and healthy:
        if instance.transition(
            [Status.STARTING],
            Status.RUNNING,
            same_process=True,
            failed_starts=0,
            health_check_failures=0,
            last_health_check=timezone.now(),
        ):
            log.info("instance %s: running", instance.name)
        return []
    if instance.pid is None:
        waited = _seconds_since(instance.started_at)
        if waited <= LAUNCH_LOST_SECS:
            return []  # being spawned right now
        return _relaunch_lost(instance, waited)
    if not alive:
        return _restart_or_fail(instance, f"process exited during startup: {_log_tail(instance)}")
    timeout = instance.startup_timeout_secs or settings.TEI.startup_timeout_secs
    if _seconds_since(instance.started_at) <= timeout:
        return []
    reason = f"not healthy within startup_timeout_secs={timeout}: {_log_tail(instance)}"
    pid, started_at = instance.pid, instance.process_started_at
    with transaction.atomic():
        # Win the compare-and-set before the kill, so that a concurrent tick that sees the
        # process die cannot take it for a crash and restart it.
        if not instance.transition(
            [Status.STARTING], Status.FAILED, same_process=True, pid=None, last_error=reason
        ):
            return []
        orphan = _record_orphan(instance, pid, started_at)
    log.warning("instance %s: failed: %s", instance.name, reason)
    return [Work(KILL_ORPHAN, orphan.pk)]


def _relaunch_lost(instance: Instance, waited: float) -> list[Work]:
    """A launch that died between its claim and its pid: launch again, counted as a restart
    so that the operator sees it. A process it spawned goes into the row, for the launch to
    retire first (found before the compare-and-set: a launch that saves its pid meanwhile
    makes it fail; one that saves after finds the claim gone and kills its process)."""
    strays = process.find_launched(instance, settings.TEI.tei_binary_path)
    pid, started_at = strays[0] if strays else (None, None)
    reason = f"launch lost: no pid saved {waited:.0f} s after the launch began (its worker died?)"
    reason += (
        f"; stopping the process it left ({pid}) and launching again"
        if pid
        else ("; launching again")
    )
    if not instance.transition(
        [Status.STARTING],
        Status.PENDING,
        same_process=True,
        pid=pid,
        process_started_at=started_at,
        restarts=F("restarts") + 1,
        health_check_failures=0,
        next_restart_at=None,
        last_error=reason,
    ):
        return []
    log.warning("instance %s: %s", instance.name, reason)
    orphans = [_record_orphan(instance, pid, started_at) for pid, started_at in strays[1:]]
    return [Work(LAUNCH, instance.pk)] + [Work(KILL_ORPHAN, orphan.pk) for orphan in orphans]


def _converge_running(instance: Instance, alive: bool, healthy: bool) -> list[Work]:
    if not alive:
        return _restart(instance, f"process {instance.pid} exited: {_log_tail(instance)}", delay=0)
    failures = instance.health_check_failures + 1
    instance.transition(
        [Status.RUNNING],
        Status.RUNNING,
        same_process=True,
        health_check_failures=failures,
        health_check_failures_total=F("health_check_failures_total") + 1,
        last_health_check=timezone.now(),
    )
    if failures >= settings.TEI.max_failures_before_restart:
        return _restart(instance, f"{failures} health checks failed in a row", delay=_interval())
    return []


def _restart_or_fail(instance: Instance, reason: str) -> list[Work]:
    """A start died before it became healthy: retry with back-off, or give up."""
    failed_starts = instance.failed_starts + 1
    if failed_starts >= settings.TEI.max_failures_before_restart:
        reason = f"crash loop: {failed_starts} starts failed in a row; last: {reason}"
        if instance.transition(
            [Status.STARTING],
            Status.FAILED,
            same_process=True,
            pid=None,
            failed_starts=failed_starts,
            last_error=reason,
        ):
            log.warning("instance %s: failed: %s", instance.name, reason)
        return []
    delay = min(_interval() * 2 ** (failed_starts - 1), MAX_BACKOFF_SECS)
    return _restart(instance, reason, delay=delay, failed_starts=failed_starts)


def _restart(instance: Instance, reason: str, delay: float, failed_starts: int = 0) -> list[Work]:
    """Back to pending, counted as a restart. The old pid stays in the row: the launch
    terminates it at once, and starts the new process once `delay` has passed."""
    log.warning("instance %s: restarting in %ss: %s", instance.name, delay, reason)
    next_at = timezone.now() + timedelta(seconds=delay) if delay else None
    attributes = {tracing.INSTANCE_ATTRIBUTE: instance.name, "tei_manager.reason": reason}
    with tracing.span("instance.repair", attributes=attributes):
        moved = instance.transition(
            [instance.status],
            Status.PENDING,
            same_process=True,
            restarts=F("restarts") + 1,
            failed_starts=failed_starts,
            health_check_failures=0,
            next_restart_at=next_at,
            last_error=reason,
        )
        trace = tuple(tracing.carrier().items())
    return [Work(LAUNCH, instance.pk, trace)] if moved else []


def _record_orphan(instance: Instance, pid: int | None, started_at: float | None) -> OrphanProcess:
    return OrphanProcess.objects.create(
        node=instance.node, name=instance.name, pid=pid, process_started_at=started_at
    )


def _check_health(instances: list[Instance]) -> dict[int, bool]:
    if not instances:
        return {}
    timeout = min(HEALTH_TIMEOUT_SECS, float(_interval()))
    with ThreadPoolExecutor(max_workers=min(16, len(instances))) as pool:
        results = pool.map(lambda i: process.health_check(i.address, timeout, i.api_key), instances)
        return {i.pk: ok for i, ok in zip(instances, results, strict=True)}


def _log_tail(instance: Instance) -> str:
    lines = logs.tail(settings.LOG_DIR, instance.name, LOG_LINES_IN_ERROR)
    lines = [line for line in lines if not line.startswith("--- ")] or ["(log is empty)"]
    return "\n".join(lines)


def _seconds_since(moment: datetime | None) -> float:
    return float("inf") if moment is None else (timezone.now() - moment).total_seconds()


def _grace() -> float:
    return float(settings.TEI.graceful_shutdown_timeout_secs)


def _interval() -> int:
    return settings.TEI.health_check_interval_secs
