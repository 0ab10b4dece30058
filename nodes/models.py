"""A Node: one host whose worker runs instances, as that worker last described it.

Each worker writes its own row every few seconds (nodes/registry.py); nothing else does.
Up or down is not stored: a node is up while its last heartbeat is younger than
`node_timeout_secs`, so a worker that dies (or loses the database) turns its node down
without anyone writing it.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Count, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone


class NodeStatus(models.TextChoices):
    UP = "up"
    DOWN = "down"


def down_before(now: datetime | None = None) -> datetime:
    """A node last seen before this moment is down."""
    return (now or timezone.now()) - timedelta(seconds=settings.TEI.node_timeout_secs)


class NodeQuerySet(models.QuerySet["Node"]):
    def up(self) -> NodeQuerySet:
        return self.filter(last_seen__gte=down_before())

    def down(self) -> NodeQuerySet:
        return self.filter(last_seen__lt=down_before())

    def with_instance_counts(self) -> NodeQuerySet:
        """Each node annotated with `instance_count`: the instances placed on it."""
        from instances.models import Instance

        counts = (
            Instance.objects.filter(node=OuterRef("name"))
            .order_by()
            .values("node")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return self.annotate(instance_count=Coalesce(Subquery(counts), 0))


class Node(models.Model):
    name = models.CharField(max_length=255, unique=True)
    # The address the multiplexer (and the node's own health checks) dial for its instances.
    instance_host = models.CharField(max_length=255)
    port_start = models.PositiveIntegerField()
    port_end = models.PositiveIntegerField()
    prometheus_port_start = models.PositiveIntegerField()
    prometheus_port_end = models.PositiveIntegerField()
    # [{"index", "name", "memory_total_bytes", "memory_free_bytes"}], from NVML; []: none.
    gpus = models.JSONField(default=list, blank=True)
    cpu_count = models.PositiveIntegerField(default=0)
    ram_bytes = models.PositiveBigIntegerField(default=0)
    version = models.CharField(max_length=32, blank=True, default="")
    registered_at = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField()

    objects = NodeQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def status(self) -> str:
        return NodeStatus.UP if self.last_seen >= down_before() else NodeStatus.DOWN

    @property
    def is_up(self) -> bool:
        return self.status == NodeStatus.UP

    @property
    def gpu_memory_free_bytes(self) -> int:
        return sum(int(gpu.get("memory_free_bytes", 0)) for gpu in self.gpus)


def down_node_names() -> set[str]:
    """The registered nodes that are down (an unregistered node is not known to be)."""
    return set(Node.objects.down().values_list("name", flat=True))


def node_addresses() -> dict[str, tuple[str, bool]]:
    """name -> (instance_host, up) for every registered node (the multiplexer's read)."""
    cutoff = down_before()
    return {
        name: (host, last_seen >= cutoff)
        for name, host, last_seen in Node.objects.values_list("name", "instance_host", "last_seen")
    }


def with_node_seen(instances: models.QuerySet[Any]) -> models.QuerySet[Any]:
    """Instances annotated with their node's last heartbeat (`node_seen`, None when the
    node is not registered), for `is_on_down_node` without a query per row."""
    seen = Node.objects.filter(name=OuterRef("node")).values("last_seen")[:1]
    return instances.annotate(node_seen=Subquery(seen))


def is_on_down_node(instance: Any) -> bool:
    seen = getattr(instance, "node_seen", None)
    return seen is not None and seen < down_before()
