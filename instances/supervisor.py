"""The worker side of the lifecycle: launch, stop, health-check and repair the processes
of one node. Celery tasks call these; each step is a compare-and-set on the row, so a
duplicate or late message does nothing harmful.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from instances import process
from instances.launch import LaunchContractError, binary_command
from instances.models import DesiredState, Heartbeat, Instance, OrphanProcess, Status

log = logging.getLogger(__name__)

LOG_LINES_IN_ERROR = 10
HEALTH_TIMEOUT_SECS = 2.0
MAX_BACKOFF_SECS = 300


def launch(pk: int) -> None:
    """Start the process of a `pending` instance (stopping a previous one first)."""
    instance = Instance.objects.filter(pk=pk).first()
    if instance is None or instance.desired_state != DesiredState.RUNNING:
        return
    if instance.next_restart_at and instance.next_restart_at > timezone.now():
        return  # backing off: a later reconcile tick launches it
    old_pid, old_create_time = instance.pid, instance.process_started_at
    # The old pid leaves the row here: until the new one is saved, a concurrent tick sees
    # "being spawned", not a dead process to restart.
    if not instance.transition(
        [Status.PENDING],
        Status.STARTING,
        started_at=timezone.now(),
        pid=None,
    ):
        return
    process.terminate(old_pid, old_create_time, _grace())
    try:
        spawned = process.spawn(instance, settings.TEI.tei_binary_path, settings.LOG_DIR)
    except LaunchContractError as exc:
        instance.transition([Status.STARTING], Status.FAILED, pid=None, last_error=str(exc))
        return
    except OSError as exc:
        command = binary_command(settings.TEI.tei_binary_path)[0]
        instance.transition(
            [Status.STARTING],
            Status.FAILED,
            pid=None,
            last_error=f"cannot run {command}: {exc}",
        )
        return
    saved = instance.transition(
        [Status.STARTING],
        Status.STARTING,
        pid=spawned.pid,
        process_started_at=spawned.create_time,
        next_restart_at=None,
    )
    if not saved:  # stopped or deleted while it was being spawned
        process.terminate(spawned.pid, spawned.create_time, _grace())
    else:
        log.info("instance %s: started pid %s", instance.name, spawned.pid)


def watch_start(pk: int) -> bool:
    """Check a starting instance once, so that `running` does not wait for the next beat
    tick. True while it is still starting and worth another look."""
    instance = Instance.objects.filter(pk=pk, status=Status.STARTING).first()
    if instance is None or instance.pid is None:
        return instance is not None
    alive = process.is_alive(instance.pid, instance.process_started_at)
    healthy = alive and process.health_check(instance.address, HEALTH_TIMEOUT_SECS)
    _converge_starting(instance, alive, healthy)
    return instance.status == Status.STARTING


def stop(pk: int) -> None:
    """Stop the process of a `stopping` instance; start it again if that is wanted now."""
    instance = Instance.objects.filter(pk=pk).first()
    if instance is None or instance.status != Status.STOPPING:
        return
    process.terminate(instance.pid, instance.process_started_at, _grace())
    if not instance.transition([Status.STOPPING], Status.STOPPED, pid=None):
        return
    instance.refresh_from_db()
    if instance.desired_state == DesiredState.RUNNING and instance.transition(
        [Status.STOPPED], Status.PENDING
    ):
        launch(pk)


def kill_orphan(pk: int) -> None:
    """Stop the process a deleted instance left behind."""
    orphan = OrphanProcess.objects.filter(pk=pk).first()
    if orphan is not None:
        _kill_orphans([orphan], _grace())


def _kill_orphans(orphans: list[OrphanProcess], grace_secs: float) -> None:
    process.terminate_many([(o.pid, o.process_started_at) for o in orphans], grace_secs)
    OrphanProcess.objects.filter(pk__in=[o.pk for o in orphans]).delete()
    for orphan in orphans:
        log.info("instance %s: deleted, process %s stopped", orphan.name, orphan.pid)


def reconcile_node(node: str) -> None:
    """One tick: converge every instance of `node` to its desired state."""
    Heartbeat.beat("reconcile")
    process.reap_children()
    orphans = list(OrphanProcess.objects.filter(node=node))
    if orphans:  # a kill message was lost
        _kill_orphans(orphans, _grace())
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
    for instance in instances:
        if instance.pk in passed:
            continue
        try:
            reconcile_instance(instance, alive[instance.pk], healthy.get(instance.pk, False))
        except Exception:
            log.exception("instance %s: reconcile failed", instance.name)


def reconcile_instance(instance: Instance, alive: bool, healthy: bool) -> None:
    if instance.desired_state == DesiredState.STOPPED:
        _converge_stopped(instance, alive)
    elif instance.status == Status.PENDING:
        launch(instance.pk)
    elif instance.status == Status.STOPPED:
        if instance.transition([Status.STOPPED], Status.PENDING):
            launch(instance.pk)
    elif instance.status == Status.STOPPING:
        if not alive:
            instance.transition([Status.STOPPING], Status.STOPPED, pid=None)
    elif instance.status == Status.STARTING:
        _converge_starting(instance, alive, healthy)
    elif instance.status == Status.RUNNING:
        _converge_running(instance, alive, healthy)


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
        if instance.desired_state == DesiredState.STOPPED:
            instance.transition([instance.status], Status.STOPPED, pid=None)
        elif settings.TEI.auto_restore_on_restart:
            ran = instance.pid is not None
            if instance.transition(
                [instance.status],
                Status.PENDING,
                pid=None,
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


def _converge_stopped(instance: Instance, alive: bool) -> None:
    if instance.status in Status.active():
        # The stop message was lost, or a live process was adopted that should not run.
        if instance.transition(Status.active(), Status.STOPPING):
            stop(instance.pk)
    elif instance.status == Status.STOPPING:
        if not alive:
            instance.transition([Status.STOPPING], Status.STOPPED, pid=None)
        elif _seconds_since(instance.updated_at) > 2 * _grace():
            stop(instance.pk)  # the stop task should have finished long ago
    elif alive:
        process.terminate(instance.pid, instance.process_started_at, _grace())


def _converge_starting(instance: Instance, alive: bool, healthy: bool) -> None:
    if alive and healthy:
        instance.transition(
            [Status.STARTING],
            Status.RUNNING,
            failed_starts=0,
            health_check_failures=0,
            last_health_check=timezone.now(),
        )
        log.info("instance %s: running", instance.name)
        return
    timeout = instance.startup_timeout_secs or settings.TEI.startup_timeout_secs
    if instance.pid is None:
        # Being spawned right now, or the worker died mid-launch: give it the startup time.
        if _seconds_since(instance.started_at) > timeout:
            instance.transition([Status.STARTING], Status.PENDING)
        return
    if not alive:
        _restart_or_fail(instance, f"process exited during startup: {_log_tail(instance)}")
    elif _seconds_since(instance.started_at) > timeout:
        reason = f"not healthy within startup_timeout_secs={timeout}: {_log_tail(instance)}"
        # Win the compare-and-set before killing, so that a concurrent tick that sees the
        # process die cannot take it for a crash and restart it.
        pid, started_at = instance.pid, instance.process_started_at
        if instance.transition(
            [Status.STARTING], Status.FAILED, same_process=True, pid=None, last_error=reason
        ):
            process.terminate(pid, started_at, _grace())
            log.warning("instance %s: failed: %s", instance.name, reason)


def _converge_running(instance: Instance, alive: bool, healthy: bool) -> None:
    if not alive:
        reason = f"process {instance.pid} exited: {_log_tail(instance)}"
        _restart(instance, reason, delay=0)
        return
    failures = instance.health_check_failures + 1
    instance.transition(
        [Status.RUNNING],
        Status.RUNNING,
        health_check_failures=failures,
        health_check_failures_total=F("health_check_failures_total") + 1,
        last_health_check=timezone.now(),
    )
    if failures >= settings.TEI.max_failures_before_restart:
        _restart(instance, f"{failures} health checks failed in a row", delay=_interval())


def _restart_or_fail(instance: Instance, reason: str) -> None:
    """A start died before it became healthy: retry with back-off, or give up."""
    failed_starts = instance.failed_starts + 1
    if failed_starts >= settings.TEI.max_failures_before_restart:
        reason = f"crash loop: {failed_starts} starts failed in a row; last: {reason}"
        instance.transition(
            [Status.STARTING],
            Status.FAILED,
            same_process=True,
            pid=None,
            failed_starts=failed_starts,
            last_error=reason,
        )
        log.warning("instance %s: failed: %s", instance.name, reason)
        return
    delay = min(_interval() * 2 ** (failed_starts - 1), MAX_BACKOFF_SECS)
    _restart(instance, reason, delay=delay, failed_starts=failed_starts)


def _restart(instance: Instance, reason: str, delay: float, failed_starts: int = 0) -> None:
    log.warning("instance %s: restarting in %ss: %s", instance.name, delay, reason)
    next_at = timezone.now() + timedelta(seconds=delay) if delay else None
    old_pid, old_started_at = instance.pid, instance.process_started_at
    # The pid stays in the row: whoever launches next terminates it first.
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
    if not moved:
        return  # another tick or a request got there first
    process.terminate(old_pid, old_started_at, _grace())
    if not delay:
        launch(instance.pk)


def _check_health(instances: list[Instance]) -> dict[int, bool]:
    if not instances:
        return {}
    timeout = min(HEALTH_TIMEOUT_SECS, float(_interval()))
    with ThreadPoolExecutor(max_workers=min(16, len(instances))) as pool:
        results = pool.map(lambda i: process.health_check(i.address, timeout), instances)
        return {i.pk: ok for i, ok in zip(instances, results, strict=True)}


def _log_tail(instance: Instance) -> str:
    lines = process.tail(process.log_path(settings.LOG_DIR, instance.name), LOG_LINES_IN_ERROR)
    lines = [line for line in lines if not line.startswith("--- ")] or ["(log is empty)"]
    return "\n".join(lines)


def _seconds_since(moment: datetime | None) -> float:
    return float("inf") if moment is None else (timezone.now() - moment).total_seconds()


def _grace() -> float:
    return float(settings.TEI.graceful_shutdown_timeout_secs)


def _interval() -> int:
    return settings.TEI.health_check_interval_secs
