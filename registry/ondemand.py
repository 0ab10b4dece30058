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

from access.audit import Actor
from access.models import ActorKind
from instances import services as instances
from instances.errors import AlreadyRunning, InstanceExists, ModelNotFound
from instances.models import Instance, Status
from registry.models import Model
from registry.services import instance_defaults

log = logging.getLogger(__name__)

ON_DEMAND = Actor(ActorKind.SYSTEM, "on-demand", "")


def ensure_instance(model_id: str) -> str:
    """The name of an instance of `model_id` that is running or on its way; ModelNotFound
    when the model is not registered for on-demand starts."""
    model = Model.objects.filter(model_id=model_id).first()
    if model is None or not (model.on_demand or settings.TEI.on_demand_default):
        raise ModelNotFound(f"model '{model_id}' is not registered to start on demand")
    existing = list(Instance.objects.filter(model_id=model_id).order_by("name"))
    for instance in existing:
        if instance.status in Status.active():
            return instance.name
    if existing:
        return _start(existing[0].name)
    name = instance_name(model_id)
    try:
        fields = {k: v for k, v in instance_defaults(model).items() if v not in (None, "")}
        instances.create_instance(ON_DEMAND, name=name, on_demand=True, **fields)
    except InstanceExists:
        return _start(name)  # created by a concurrent caller
    log.info("model %s: instance %s created on demand", model_id, name)
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
