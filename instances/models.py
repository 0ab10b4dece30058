"""The Instance: one TEI server process serving one model on one port."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import models
from django.db.models import F
from django.utils import timezone


class Status(models.TextChoices):
    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @classmethod
    def active(cls) -> list[str]:
        """States in which a process exists or is about to."""
        return [cls.PENDING, cls.STARTING, cls.RUNNING]

    @classmethod
    def terminal(cls) -> list[str]:
        return [cls.STOPPED, cls.FAILED]


class DesiredState(models.TextChoices):
    RUNNING = "running"
    STOPPED = "stopped"


class Pooling(models.TextChoices):
    CLS = "cls"
    MEAN = "mean"
    SPLADE = "splade"
    LAST_TOKEN = "last-token"


class Instance(models.Model):
    # Configuration: immutable after create.
    name = models.SlugField(max_length=64, unique=True)
    model_id = models.CharField(max_length=255)
    port = models.PositiveIntegerField()
    prometheus_port = models.PositiveIntegerField()
    gpu_id = models.PositiveIntegerField(null=True, blank=True)
    max_batch_tokens = models.PositiveIntegerField(default=16384)
    max_concurrent_requests = models.PositiveIntegerField(default=512)
    pooling = models.CharField(max_length=16, choices=Pooling.choices, blank=True, default="")
    auto_truncate = models.BooleanField(default=True)
    startup_timeout_secs = models.PositiveIntegerField(null=True, blank=True)
    extra_args = models.JSONField(default=list, blank=True)
    node = models.CharField(max_length=255, default="")
    # Stopped after this long without a call (None: the model's idle_timeout_secs, if any).
    idle_timeout_secs = models.PositiveIntegerField(null=True, blank=True)
    # Created by a call for an on-demand model (registry/ondemand.py), not by an operator.
    on_demand = models.BooleanField(default=False)
    host = models.CharField(max_length=255, default="127.0.0.1")
    # When its node goes down, place it on another node and start it there (nodes/failover.py).
    failover = models.BooleanField(default=False)
    # The instance's own API key, generated at create and passed to it as API_KEY: the
    # multiplexer and the health check send it, so the instance's port refuses everyone
    # else. Never shown (API, admin, logs); `repr` of a row does not print fields.
    api_key = models.CharField(max_length=64, blank=True, default="", editable=False)

    # Desired and observed state.
    desired_state = models.CharField(
        max_length=16, choices=DesiredState.choices, default=DesiredState.RUNNING
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )

    # Runtime facts.
    pid = models.PositiveIntegerField(null=True, blank=True)
    # A fresh value each time a worker claims the launch (pending -> starting): every write
    # that follows checks it, so a launch that another one superseded cannot record its pid.
    launch_token = models.CharField(max_length=32, blank=True, default="")
    process_started_at = models.FloatField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    restarts = models.PositiveIntegerField(default=0)
    health_check_failures = models.PositiveIntegerField(default=0)
    # Never reset: the source of tei_manager_health_check_failures_total.
    health_check_failures_total = models.PositiveIntegerField(default=0)
    # Starts in a row that died before becoming healthy: the crash-loop detector.
    failed_starts = models.PositiveIntegerField(default=0)
    last_health_check = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    # The last call the multiplexer routed here, written in batches (never per call).
    last_call_at = models.DateTimeField(null=True, blank=True)
    next_restart_at = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["node", "port"], name="unique_node_port"),
            models.UniqueConstraint(
                fields=["node", "prometheus_port"], name="unique_node_prometheus_port"
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def address(self) -> str:
        """host:port the multiplexer and the health check dial."""
        return f"{self.host}:{self.port}"

    def transition(
        self,
        from_states: Iterable[str],
        to_status: str,
        *,
        same_process: bool = False,
        **fields: Any,
    ) -> bool:
        """Compare-and-set: move to `to_status` only if the row is still in `from_states`
        (and, with `same_process`, still records the pid and the launch this object read).

        Returns False (and changes nothing) when another process got there first.
        `pid=None` forgets the process whole: its start time goes with it.
        """
        fields = {"status": to_status, **fields}
        if "pid" in fields and fields["pid"] is None:
            fields["process_started_at"] = None
        rows = Instance.objects.filter(pk=self.pk, status__in=list(from_states))
        if same_process:
            rows = rows.filter(pid=self.pid, launch_token=self.launch_token)
        updated = rows.update(updated_at=timezone.now(), **fields)
        if updated:
            for key, value in fields.items():
                if not hasattr(value, "resolve_expression"):
                    setattr(self, key, value)
        return bool(updated)


class Heartbeat(models.Model):
    """Last sign of life of a background process ("reconcile", "multiplexer", ...)."""

    name = models.CharField(max_length=64, unique=True)
    last_seen = models.DateTimeField()

    def __str__(self) -> str:
        return self.name

    @classmethod
    def beat(cls, name: str) -> None:
        cls.objects.update_or_create(name=name, defaults={"last_seen": timezone.now()})


class Counter(models.Model):
    """A monotonic counter kept in the database, so every process's increments add up."""

    name = models.CharField(max_length=128, unique=True)
    value = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.name}={self.value}"

    @classmethod
    def increment(cls, name: str, by: int = 1) -> None:
        if not cls.objects.filter(name=name).update(value=F("value") + by):
            counter, created = cls.objects.get_or_create(name=name, defaults={"value": by})
            if not created:
                cls.objects.filter(pk=counter.pk).update(value=F("value") + by)

    @classmethod
    def get(cls, name: str) -> int:
        return cls.objects.filter(name=name).values_list("value", flat=True).first() or 0


class OrphanProcess(models.Model):
    """The process of a deleted instance, until its node's worker has stopped it."""

    node = models.CharField(max_length=255)
    name = models.CharField(max_length=64)
    pid = models.PositiveIntegerField()
    process_started_at = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.name} (pid {self.pid})"


class Seed(models.Model):
    """A `[[instances]]` entry of the config file that was created once: never again."""

    name = models.CharField(max_length=64, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.name
