"""The Model: one embedding model the manager knows, where its files are, what it is.

available -> downloading -> downloaded -> loading -> verified, or failed (with its error).
Every change is a compare-and-set on the status (`Model.transition`), and a download or
a check claims the row with a fresh `task_token` that each of its later writes checks:
a download that was cancelled, or superseded, cannot write over what came after it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import models
from django.utils import timezone

from instances.models import Pooling

# Weights are stored as float32 (safetensors) unless told otherwise: what a dtype keeps.
DTYPE_FACTORS = {"": 1.0, "float32": 1.0, "float16": 0.5, "bfloat16": 0.5, "int8": 0.25}
# Activations, the runtime and its buffers: a share of the weights plus a fixed part.
MARGIN_RATIO, MARGIN_BYTES = 0.2, 256 * 1024 * 1024


class ModelStatus(models.TextChoices):
    AVAILABLE = "available"  # registered; its files are not on this host
    DOWNLOADING = "downloading"
    DOWNLOADED = "downloaded"  # its files are on this host
    LOADING = "loading"  # a check (verify) is loading it
    VERIFIED = "verified"  # a check loaded it and embedded a probe text
    FAILED = "failed"

    @classmethod
    def busy(cls) -> list[str]:
        """A task owns the row: no other download, check or delete."""
        return [cls.DOWNLOADING, cls.LOADING]

    @classmethod
    def downloadable(cls) -> list[str]:
        return [cls.AVAILABLE, cls.DOWNLOADED, cls.VERIFIED, cls.FAILED]

    @classmethod
    def on_disk(cls) -> list[str]:
        return [cls.DOWNLOADED, cls.VERIFIED]


class Source(models.TextChoices):
    CACHE = "cache"  # found in the Hugging Face cache
    PACKAGED = "packaged"  # shipped as a Python package (localtei's packaged models)
    CONFIG = "config"  # a [[models]] entry of the config file
    API = "api"  # registered through the API or the admin


class Model(models.Model):
    model_id = models.CharField(max_length=255, unique=True)
    revision = models.CharField(max_length=255, blank=True, default="")  # "": the default branch
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.API)

    # What instances of this model are created with.
    pooling = models.CharField(max_length=16, choices=Pooling.choices, blank=True, default="")
    dtype = models.CharField(max_length=16, blank=True, default="")
    max_batch_tokens = models.PositiveIntegerField(default=16384)
    max_concurrent_requests = models.PositiveIntegerField(default=512)
    auto_truncate = models.BooleanField(default=True)
    # Started by the first call that finds no running instance (on_demand_default: all).
    on_demand = models.BooleanField(default=False)
    # An instance that got no call for this long is stopped (None: never).
    idle_timeout_secs = models.PositiveIntegerField(null=True, blank=True)
    # An on-demand start that finds no memory free first stops the least recently used
    # on-demand instance.
    evict_idle = models.BooleanField(default=False)

    status = models.CharField(
        max_length=16, choices=ModelStatus.choices, default=ModelStatus.AVAILABLE
    )
    task_token = models.CharField(max_length=32, blank=True, default="")
    node = models.CharField(max_length=255, blank=True, default="")  # where the task runs
    cancel_requested = models.BooleanField(default=False)
    bytes_done = models.PositiveBigIntegerField(default=0)
    bytes_total = models.PositiveBigIntegerField(null=True, blank=True)
    size_on_disk = models.PositiveBigIntegerField(null=True, blank=True)
    commit_sha = models.CharField(max_length=64, blank=True, default="")

    # What the last check measured.
    dimensions = models.PositiveIntegerField(null=True, blank=True)
    max_input_length = models.PositiveIntegerField(null=True, blank=True)
    model_type = models.CharField(max_length=16, blank=True, default="")
    load_time_secs = models.FloatField(null=True, blank=True)
    memory_bytes = models.PositiveBigIntegerField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)

    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id"]

    def __str__(self) -> str:
        return self.model_id

    @property
    def memory_estimate(self) -> int | None:
        """Bytes an instance needs: what the check measured, else the weights' size times
        the dtype's factor plus a margin; None when neither is known."""
        if self.memory_bytes:
            return int(self.memory_bytes)
        if not self.size_on_disk:
            return None
        factor = DTYPE_FACTORS.get(self.dtype, 1.0)
        return int(self.size_on_disk * factor * (1 + MARGIN_RATIO)) + MARGIN_BYTES

    @property
    def progress_percent(self) -> int | None:
        if not self.bytes_total:
            return None
        return min(100, int(100 * self.bytes_done / self.bytes_total))

    def transition(
        self, from_states: Iterable[str], to_status: str, *, same_task: bool = False, **fields: Any
    ) -> bool:
        """Compare-and-set: move to `to_status` only if the row is still in `from_states`
        (and, with `same_task`, still claimed by the task this object read). False, and
        nothing changed, when someone else got there first."""
        fields = {"status": to_status, **fields}
        rows = Model.objects.filter(pk=self.pk, status__in=list(from_states))
        if same_task:
            rows = rows.filter(task_token=self.task_token)
        updated = rows.update(updated_at=timezone.now(), **fields)
        if updated:
            for key, value in fields.items():
                setattr(self, key, value)
        return bool(updated)
