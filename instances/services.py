"""The lifecycle service: the one place the API, the admin and the Celery tasks change
instances. Requests only change the desired state and enqueue work; they never wait for a
process. Every status change is a compare-and-set (`Instance.transition`). Every change
asked for (create, start, stop, restart, delete) is recorded in the audit trail with its
actor and result.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, F, Q, When

from access import audit
from access.audit import SYSTEM, Actor
from instances import logs, tasks
from instances import placement as gpu_placement
from instances.errors import (
    AlreadyRunning,
    InstanceExists,
    InstanceNotFound,
    MaxInstancesReached,
    NotRunning,
    PortConflict,
    ValidationFailed,
)
from instances.models import Counter, DesiredState, Instance, OrphanProcess, Status
from nodes import placement
from telemetry import tracing

log = logging.getLogger(__name__)

CREATED_COUNTER = "instances_created"
DELETED_COUNTER = "instances_deleted"
# A fresh start: what start and restart reset.
_FRESH: dict[str, Any] = {
    "desired_state": DesiredState.RUNNING,
    "failed_starts": 0,
    "health_check_failures": 0,
    "next_restart_at": None,
    "last_error": "",
}


# What the registry knows of a model id (registry/apps.py sets it when installed): an
# instance created without an idle timeout takes its model's, and a model with a memory
# estimate is placed where it fits (instances/placement.py).
model_idle_timeout: Callable[[str], int | None] | None = None
memory_estimate: Callable[[str], int | None] | None = None

SUBJECT = "instance"
# A change asked of an instance that does not exist changes nothing: not in the trail.
_UNRECORDED = (InstanceNotFound,)


def create_instance(actor: Actor = SYSTEM, **fields: Any) -> Instance:
    """Save a new instance (ports allocated when not given) and enqueue its start; the
    launch task carries this span's trace context (telemetry/propagation.py)."""
    attributes = {
        tracing.INSTANCE_ATTRIBUTE: str(fields.get("name")),
        "tei_manager.model_id": str(fields.get("model_id")),
    }
    with (
        audit.recording(actor, "create", SUBJECT, str(fields.get("name", ""))),
        tracing.span("instance.create", attributes=attributes),
    ):
        try:
            with transaction.atomic():
                instance = _insert(fields)
        except IntegrityError:
            # Not expected: creates take turns (_insert); a port another node's move took.
            if Instance.objects.filter(name=fields.get("name")).exists():
                raise InstanceExists(f"instance '{fields.get('name')}' already exists") from None
            raise PortConflict("port was taken by a concurrent create; try again") from None
        log.info("instance %s: created (%s), its launch enqueued", instance.name, instance.model_id)
        return instance


def start_instance(name: str, actor: Actor = SYSTEM) -> Instance:
    with audit.recording(actor, "start", SUBJECT, name, _UNRECORDED):
        return _start(name)


def stop_instance(name: str, actor: Actor = SYSTEM) -> Instance:
    with audit.recording(actor, "stop", SUBJECT, name, _UNRECORDED):
        return _stop(name)


def restart_instance(name: str, actor: Actor = SYSTEM) -> Instance:
    """Stop the process (if any) and start a new one; counts as a restart when one ran."""
    with audit.recording(actor, "restart", SUBJECT, name, _UNRECORDED):
        return _restart(name)


def delete_instance(name: str, actor: Actor = SYSTEM) -> None:
    """Remove the row now; the instance's worker stops the process left behind."""
    with audit.recording(actor, "delete", SUBJECT, name, _UNRECORDED):
        _delete(name)


def _start(name: str) -> Instance:
    instance = get_instance(name)
    with transaction.atomic():
        if instance.transition(Status.terminal(), Status.PENDING, **_FRESH):
            _enqueue_on_commit(tasks.launch_instance, instance)
            return instance
        # A stop in flight: the stop task starts it again once the old process is gone.
        if _set_desired(instance, [Status.STOPPING], DesiredState.RUNNING):
            return instance
    raise AlreadyRunning(f"instance '{name}' is already {get_instance(name).status}")


def _stop(name: str) -> Instance:
    instance = get_instance(name)
    with transaction.atomic():
        stopped = DesiredState.STOPPED
        if instance.transition(Status.active(), Status.STOPPING, desired_state=stopped):
            _enqueue_on_commit(tasks.stop_instance, instance)
            return instance
        if _set_desired(instance, [Status.STOPPING], DesiredState.STOPPED):
            return instance
    raise NotRunning(f"instance '{name}' is {get_instance(name).status}, not running")


def _restart(name: str) -> Instance:
    instance = get_instance(name)
    with transaction.atomic():
        # Decided by the row as the update finds it: a pending row, or a launch that has no
        # pid yet, ran nothing (and a pending row with a pid already counted its restart).
        ran = Q(status=Status.RUNNING) | Q(status=Status.STARTING, pid__isnull=False)
        restarts = F("restarts") + Case(When(ran, then=1), default=0)
        if instance.transition(Status.active(), Status.PENDING, restarts=restarts, **_FRESH):
            instance.refresh_from_db()
            _enqueue_on_commit(tasks.launch_instance, instance)
            return instance
        if instance.transition(Status.terminal(), Status.PENDING, **_FRESH):
            _enqueue_on_commit(tasks.launch_instance, instance)
            return instance
        _set_desired(instance, [Status.STOPPING], DesiredState.RUNNING)
    return get_instance(name)


def _delete(name: str) -> None:
    with transaction.atomic():
        # The pid is read in the transaction that deletes the row (locked on PostgreSQL;
        # SQLite's IMMEDIATE transaction locks the database): a launch saves its pid before,
        # and it is recorded here, or after, and finds no row and kills its process itself.
        instance = Instance.objects.select_for_update().filter(name=name).first()
        if instance is None:
            raise InstanceNotFound(f"instance '{name}' not found")
        instance.delete()
        Counter.increment(DELETED_COUNTER)
        if instance.pid:
            # Recorded, so that the process is stopped even if the kill message is lost.
            orphan = OrphanProcess.objects.create(
                node=instance.node,
                name=instance.name,
                pid=instance.pid,
                process_started_at=instance.process_started_at,
            )
            transaction.on_commit(
                lambda: tasks.enqueue(tasks.kill_orphan, instance.node, [orphan.pk])
            )


def read_logs(name: str, start: int | None = None, end: int | None = None) -> dict[str, Any]:
    """Lines `[start:end]` of the instance's log (with its rotated backups, oldest first),
    with Python slice semantics; at most logs.MAX_LINES lines a call (see logs.py)."""
    instance = get_instance(name)
    return logs.read(settings.LOG_DIR, instance.name, start, end)


def instance_exists(name: str) -> bool:
    return Instance.objects.filter(name=name).exists()


def get_instance(name: str) -> Instance:
    instance = Instance.objects.filter(name=name).first()
    if instance is None:
        raise InstanceNotFound(f"instance '{name}' not found")
    return instance


def _insert(fields: dict[str, Any]) -> Instance:
    config = settings.TEI
    name = fields["name"]
    # Creates take turns: the counter's row stays locked until this create commits (on
    # PostgreSQL a row lock; SQLite's IMMEDIATE transaction holds the whole database), so
    # the checks below see every create before it. A refused create rolls it back.
    Counter.increment(CREATED_COUNTER)
    if Instance.objects.filter(name=name).exists():
        raise InstanceExists(f"instance '{name}' already exists")
    if Instance.objects.count() >= config.max_instances:
        raise MaxInstancesReached(f"the maximum of {config.max_instances} instances is reached")
    target = placement.place(fields.get("node"))  # nodes/placement.py: where, and its ports
    port, prometheus_port = placement.allocate_ports(
        target, fields.get("port"), fields.get("prometheus_port")
    )
    values = {key: value for key, value in fields.items() if value is not None}
    values.update(
        port=port,
        prometheus_port=prometheus_port,
        # The instance's own key (API_KEY in its environment): only the manager knows it.
        api_key=secrets.token_urlsafe(32),
        node=target.node,
        host=target.host,
        status=Status.PENDING,
        desired_state=DesiredState.RUNNING,
    )
    values.setdefault("startup_timeout_secs", config.startup_timeout_secs)
    values.setdefault("failover", config.failover_default)
    if "idle_timeout_secs" not in values and model_idle_timeout is not None:
        values["idle_timeout_secs"] = model_idle_timeout(str(values.get("model_id")))
    # The memory rules read this host's GPUs (or RAM): they apply where the instance lands
    # on this host's node.
    needed = memory_estimate(str(values.get("model_id"))) if memory_estimate else None
    if needed is not None and memory_estimate is not None and target.node == settings.NODE_NAME:
        values["gpu_id"] = gpu_placement.place(needed, values.get("gpu_id"), memory_estimate)
    values["pooling"] = values.get("pooling") or ""
    try:
        instance = Instance.objects.create(**values)
    except TypeError as exc:
        raise ValidationFailed(str(exc)) from None
    _enqueue_on_commit(tasks.launch_instance, instance)
    return instance


def _set_desired(instance: Instance, states: list[str], desired: str) -> bool:
    return bool(
        Instance.objects.filter(pk=instance.pk, status__in=states).update(desired_state=desired)
    )


def _enqueue_on_commit(task: Any, instance: Instance) -> None:
    pk, node = instance.pk, instance.node
    transaction.on_commit(lambda: tasks.enqueue(task, node, [pk]))
