"""The Instance: one TEI server process serving one model on one port."""

from __future__ import annotations

from django.db import models


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
    startup_timeout_secs = models.PositiveIntegerField(null=True, blank=True)
    extra_args = models.JSONField(default=list, blank=True)
    node = models.CharField(max_length=255, default="")
    host = models.CharField(max_length=255, default="127.0.0.1")

    # Desired and observed state.
    desired_state = models.CharField(
        max_length=16, choices=DesiredState.choices, default=DesiredState.RUNNING
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )

    # Runtime facts.
    pid = models.PositiveIntegerField(null=True, blank=True)
    process_started_at = models.FloatField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    restarts = models.PositiveIntegerField(default=0)
    health_check_failures = models.PositiveIntegerField(default=0)
    last_health_check = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
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
