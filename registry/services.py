"""The registry's service: the one place the API, the admin, discovery and the tasks
change Model rows. Requests change the row and enqueue the work; they never wait for a
download or a load. Every change asked for is recorded in the audit trail."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction

from access import audit
from access.audit import SYSTEM, Actor
from instances.errors import ModelBusy, ModelExists, ModelNotFound, NotDownloading
from instances.models import Instance
from registry.models import Model, ModelStatus, Source

SUBJECT = "model"
_UNRECORDED = (ModelNotFound,)


def register_model(actor: Actor = SYSTEM, source: str = Source.API, **fields: Any) -> Model:
    """Save a new model row: `downloaded` when its files are on this host already."""
    model_id = str(fields.get("model_id", ""))
    with audit.recording(actor, "register", SUBJECT, model_id):
        values = {key: value for key, value in fields.items() if value is not None}
        on_disk = files_on_disk(model_id, values.get("revision") or None)
        if on_disk is not None:
            values.update(status=ModelStatus.DOWNLOADED, size_on_disk=on_disk)
        try:
            with transaction.atomic():
                if Model.objects.filter(model_id=model_id).exists():
                    raise ModelExists(f"model '{model_id}' is already registered")
                return Model.objects.create(source=source, **values)
        except IntegrityError:
            raise ModelExists(f"model '{model_id}' is already registered") from None


def get_model(model_id: str) -> Model:
    model = Model.objects.filter(model_id=model_id).first()
    if model is None:
        raise ModelNotFound(f"model '{model_id}' not found")
    return model


def delete_model(model_id: str, actor: Actor = SYSTEM) -> None:
    """Forget the row (the files stay in the Hugging Face cache); MODEL_BUSY while a task
    owns it or an instance serves it."""
    with audit.recording(actor, "delete", SUBJECT, model_id, _UNRECORDED), transaction.atomic():
        model = get_model(model_id)
        users = list(Instance.objects.filter(model_id=model_id).values_list("name", flat=True))
        if users:
            raise ModelBusy(f"model '{model_id}' is used by instance(s) {', '.join(users)}")
        if not Model.objects.filter(pk=model.pk).exclude(status__in=ModelStatus.busy()).delete()[0]:
            raise ModelBusy(f"model '{model_id}' is {get_model(model_id).status}")


def download_model(model_id: str, actor: Actor = SYSTEM) -> Model:
    """Claim the row for a download and enqueue it; MODEL_BUSY while another task owns it."""
    from registry import tasks

    with audit.recording(actor, "download", SUBJECT, model_id, _UNRECORDED):
        model = get_model(model_id)
        with transaction.atomic():
            if not model.transition(
                ModelStatus.downloadable(),
                ModelStatus.DOWNLOADING,
                task_token=uuid.uuid4().hex,
                node=settings.NODE_NAME,
                cancel_requested=False,
                bytes_done=0,
                bytes_total=None,
                last_error="",
            ):
                raise ModelBusy(f"model '{model_id}' is {get_model(model_id).status}")
            _enqueue_on_commit(tasks.download_model, [model.pk, model.task_token])
        return model


def cancel_download(model_id: str, actor: Actor = SYSTEM) -> Model:
    """Ask the running download to stop; it ends `available` (its partial files are kept:
    the next download resumes them)."""
    with audit.recording(actor, "cancel", SUBJECT, model_id, _UNRECORDED):
        model = get_model(model_id)
        updated = Model.objects.filter(pk=model.pk, status=ModelStatus.DOWNLOADING).update(
            cancel_requested=True
        )
        if not updated:
            raise NotDownloading(f"model '{model_id}' is {model.status}, not downloading")
        model.refresh_from_db()
        return model


def verify_model(model_id: str, actor: Actor = SYSTEM) -> Model:
    """Claim the row for a check (a throwaway instance that embeds a probe text)."""
    from registry import tasks

    with audit.recording(actor, "verify", SUBJECT, model_id, _UNRECORDED):
        model = get_model(model_id)
        with transaction.atomic():
            if not model.transition(
                [*ModelStatus.on_disk(), ModelStatus.FAILED, ModelStatus.AVAILABLE],
                ModelStatus.LOADING,
                task_token=uuid.uuid4().hex,
                node=settings.NODE_NAME,
                last_error="",
            ):
                raise ModelBusy(f"model '{model_id}' is {get_model(model_id).status}")
            _enqueue_on_commit(tasks.verify_model, [model.pk, model.task_token])
        return model


def instance_defaults(model: Model) -> dict[str, Any]:
    """The create fields an instance of `model` gets unless told otherwise."""
    return {
        "model_id": model.model_id,
        "pooling": model.pooling,
        "max_batch_tokens": model.max_batch_tokens,
        "max_concurrent_requests": model.max_concurrent_requests,
        "auto_truncate": model.auto_truncate,
        "idle_timeout_secs": model.idle_timeout_secs,
    }


def files_on_disk(model_id: str, revision: str | None = None) -> int | None:
    """The size of the model's files where an instance would find them on this host
    (localtei's lookup: a directory, the HF cache offline, a package), or None."""
    from localtei.errors import StartupError
    from localtei.lookup import find_model

    try:
        location = find_model(model_id, revision)
    except StartupError:
        return None
    return directory_size(location.path)


def directory_size(path: Any) -> int:
    from pathlib import Path

    total = 0
    for item in Path(path).rglob("*"):
        try:
            if item.is_file():
                total += item.stat().st_size  # follows the snapshot's links to blobs
        except OSError:
            continue
    return total


def _enqueue_on_commit(task: Any, args: list[Any]) -> None:
    from instances.tasks import enqueue

    node = settings.NODE_NAME
    transaction.on_commit(lambda: enqueue(task, node, args))
