"""The control plane's side of an on-demand start: the multiplexer asks for an instance
of a model, this decides (start the model's stopped instance, or create one with the
model's defaults), the worker launches it. Idempotent: callers that race (several
multiplexer processes) end with one instance starting."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re

from django.conf import settings
from django.db.models import F

from access.audit import Actor
from access.models import ActorKind
from instances import placement
from instances import services as instances
from instances.errors import AlreadyRunning, InstanceExists, InsufficientMemory, ModelNotFound
from instances.models import Instance, Status
from registry.apps import memory_estimate
from registry.models import Model
from registry.services import instance_defaults

log = logging.getLogger(__name__)

ON_DEMAND = Actor(ActorKind.SYSTEM, "on-demand", "")


def ensure_instance(model_id: str) -> str:
    """The name of an instance of `model_id` that is running or on its way; ModelNotFound
    when the model is not registered for on-demand starts, InsufficientMemory when it
    does not fit (after stopping the least recently used on-demand instance, with
    evict_idle)."""
    model = Model.objects.filter(model_id=model_id).first()
    if model is None or not (model.on_demand or settings.TEI.on_demand_default):
        raise ModelNotFound(f"model '{model_id}' is not registered to start on demand")
    existing = list(Instance.objects.filter(model_id=model_id).order_by("name"))
    for instance in existing:
        if instance.status in Status.active():
            return instance.name
    try:
        return _start_or_create(model, existing)
    except InsufficientMemory:
        gpu_id = existing[0].gpu_id if existing else None
        if not model.evict_idle or evict_least_recently_used(model_id, gpu_id) is None:
            raise
        return _start_or_create(model, existing)


def evict_least_recently_used(model_id: str, gpu_id: int | None = None) -> str | None:
    """Stop the running on-demand instance (of another model; on `gpu_id` when given)
    whose last call is the oldest; its name, or None when there is none."""
    candidates = Instance.objects.filter(on_demand=True, status=Status.RUNNING).exclude(
        model_id=model_id
    )
    if gpu_id is not None:
        candidates = candidates.filter(gpu_id=gpu_id)
    victim = candidates.order_by(F("last_call_at").asc(nulls_first=True), "started_at").first()
    if victim is None:
        return None
    instances.stop_instance(victim.name, ON_DEMAND)
    log.info("instance %s: stopped to make room for model %s", victim.name, model_id)
    return victim.name


def _start_or_create(model: Model, existing: list[Instance]) -> str:
    if existing:
        needed = model.memory_estimate
        if needed is not None:
            placement.place(needed, existing[0].gpu_id, memory_estimate)
        return _start(existing[0].name)
    name = instance_name(model.model_id)
    try:
        fields = {k: v for k, v in instance_defaults(model).items() if v not in (None, "")}
        instances.create_instance(ON_DEMAND, name=name, on_demand=True, **fields)
    except InstanceExists:
        return _start(name)  # created by a concurrent caller
    log.info("model %s: instance %s created on demand", model.model_id, name)
    return name


def instance_name(model_id: str) -> str:
    """A slug for an on-demand instance of `model_id`: its last path part and a hash."""
    tail = re.sub(r"[^A-Za-z0-9_-]+", "-", model_id.rsplit("/", 1)[-1]).strip("-_")[:48]
    digest = hashlib.sha1(model_id.encode()).hexdigest()[:6]  # noqa: S324 - a name, not a secret
    return f"{tail or 'model'}-{digest}"


def _start(name: str) -> str:
    with contextlib.suppress(AlreadyRunning):  # started meanwhile
        instances.start_instance(name, ON_DEMAND)
    return name
