"""What the admin index shows: the fleet by status and its calls per second, the GPUs
(NVML), the health of each part. The fleet's charts come from telemetry/series.py.

The health panel is /health's verdict (instances/health.py), plus a broker ping. Nothing
here raises: a dead part is a red line on the dashboard, not a 500.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone
from django.utils.timesince import timesince

from instances import gpu, health
from instances.heartbeats import WORKER_PREFIX
from instances.models import Instance, Status
from telemetry import series

PROBE_TIMEOUT_SECS = 0.5


@dataclass(frozen=True)
class StatusCount:
    status: str
    label: str
    count: int


@dataclass
class Gpu:
    index: int
    name: str
    memory_used: int
    memory_total: int
    utilisation: int
    instances: list[Instance] = field(default_factory=list)

    @property
    def memory_percent(self) -> int:
        return round(100 * self.memory_used / self.memory_total) if self.memory_total else 0


@dataclass
class GpuPanel:
    gpus: list[Gpu]
    # Why no GPU is listed ("" when NVML answered), and instances pinned to an index NVML
    # does not know (a typo, or a GPU that disappeared).
    error: str = ""
    unplaced: list[Instance] = field(default_factory=list)


@dataclass(frozen=True)
class PartHealth:
    name: str
    ok: bool | None  # None: not checked (disabled, or a part it depends on is down)
    detail: str


def fleet_summary() -> list[StatusCount]:
    """Every status with its instance count, zeros included, in lifecycle order."""
    counts = dict(Instance.objects.values_list("status").annotate(n=Count("id")))
    return [StatusCount(value, label, counts.get(value, 0)) for value, label in Status.choices]


def fleet_calls_per_sec() -> float | None:
    """Calls per second over every instance, from the newest roll-up (None: none fresh)."""
    return series.fleet_calls_per_sec()


def gpu_panel() -> GpuPanel:
    """Per GPU: name, memory, utilisation and the instances pinned to it, read from NVML."""
    pinned: dict[int, list[Instance]] = {}
    for instance in Instance.objects.filter(gpu_id__isnull=False).order_by("name"):
        assert instance.gpu_id is not None
        pinned.setdefault(instance.gpu_id, []).append(instance)
    if gpu.device_count() is None:
        return GpuPanel([], "No NVIDIA GPU detected (NVML is not available).", _flatten(pinned))
    gpus = [
        Gpu(s.index, s.name, s.memory_used_bytes, s.memory_total_bytes, s.utilization_percent)
        for s in gpu.stats()
    ]
    if not gpus:
        return GpuPanel([], "No NVIDIA GPU detected.", _flatten(pinned))
    for card in gpus:
        card.instances = pinned.pop(card.index, [])
    return GpuPanel(gpus, "", _flatten(pinned))


def parts_health() -> list[PartHealth]:
    """Database, broker, beat, reconcile, each worker and the multiplexer, each with a
    one-line reason. The verdicts are /health's (instances/health.py); only the broker
    line is a probe of its own."""
    verdict = health.evaluate()
    if verdict.database_error:
        database = PartHealth("Database", False, f"{connection.vendor}: {verdict.database_error}")
    else:
        database = PartHealth("Database", True, connection.vendor)
    parts = [database, _check_broker()]
    parts += [_heartbeat_line(part) for part in verdict.parts]
    if not settings.TEI.grpc_enabled:
        parts.append(PartHealth("Multiplexer", None, "disabled (TEI_MANAGER_GRPC_ENABLED=false)"))
    return parts


def _flatten(pinned: dict[int, list[Instance]]) -> list[Instance]:
    return [instance for index in sorted(pinned) for instance in pinned[index]]


def _check_broker() -> PartHealth:
    url = settings.CELERY_BROKER_URL
    shown = _redact(url)
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=PROBE_TIMEOUT_SECS, socket_connect_timeout=PROBE_TIMEOUT_SECS
        )
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return PartHealth("Broker", False, f"{shown} does not answer: {exc}")
    return PartHealth("Broker", True, f"{shown} answers")


def _heartbeat_line(part: health.Part) -> PartHealth:
    label = _LABELS.get(part.name) or "Worker " + part.name.removeprefix(WORKER_PREFIX)
    seen = f"last heartbeat {_ago(part.last_seen)}" if part.last_seen else "no heartbeat yet"
    if part.state == health.OK:
        return PartHealth(label, True, seen)
    if part.state == health.STARTING:
        return PartHealth(label, None, f"starting: not seen since start-up; {seen}")
    return PartHealth(
        label, False, f"{seen}, stale after {part.limit_secs:g}s{_HINTS.get(part.name, '')}"
    )


_LABELS = {"beat": "Beat", "reconcile": "Reconcile", "multiplexer": "Multiplexer"}
_HINTS = {
    "beat": "; is celery beat running?",
    "reconcile": "; beat's tick is not run: is a worker up, and the broker?",
}


def _ago(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = int((timezone.now() - moment).total_seconds())
    return f"{seconds}s ago" if seconds < 120 else f"{timesince(moment)} ago"


def _redact(url: str) -> str:
    """The broker URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"
