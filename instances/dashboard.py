"""What the admin index shows: the fleet by status, the GPUs (NVML), the health of each part.

Every probe has a short timeout and never raises: a dead part is a red line on the
dashboard, not a 500.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import grpc
import redis
from django.conf import settings
from django.db import connection
from django.db.models import Count
from django.utils import timezone
from django.utils.timesince import timesince
from grpc_health.v1 import health_pb2, health_pb2_grpc

from instances import gpu, services
from instances.models import Instance, Status

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
    """Database, broker, worker, beat and multiplexer, each with a one-line reason."""
    database = _check_database()
    broker = _check_broker()
    beats = _heartbeats() if database.ok else {}
    reconcile = beats.get("reconcile")
    worker, beat = _check_worker_and_beat(broker.ok, reconcile)
    return [database, broker, worker, beat, _check_multiplexer(beats.get("multiplexer"))]


def _flatten(pinned: dict[int, list[Instance]]) -> list[Instance]:
    return [instance for index in sorted(pinned) for instance in pinned[index]]


def _check_database() -> PartHealth:
    vendor = connection.vendor
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        return PartHealth("Database", False, f"{vendor}: {exc}")
    return PartHealth("Database", True, vendor)


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


def _heartbeats() -> dict[str, datetime | None]:
    try:
        return dict(services.heartbeats())
    except Exception:
        return {}


def _check_worker_and_beat(
    broker_ok: bool | None, reconcile: datetime | None
) -> tuple[PartHealth, PartHealth]:
    """A fresh reconcile heartbeat proves both: beat scheduled the task and a worker ran it.

    Only when it is stale does it cost a Celery ping, to tell which of the two is down.
    """
    if _is_fresh(reconcile):
        seen = f"last reconcile {_ago(reconcile)}"
        return PartHealth("Worker", True, seen), PartHealth("Beat", True, seen)
    last = f"last reconcile {_ago(reconcile)}" if reconcile else "no reconcile yet"
    if not broker_ok:
        worker = PartHealth("Worker", None, "not checked: the broker is down")
        return worker, PartHealth("Beat", None, f"not checked: the broker is down; {last}")
    workers = _ping_workers()
    if not workers:
        worker = PartHealth("Worker", False, f"no worker answers a ping; {last}")
        return worker, PartHealth("Beat", None, f"unknown while no worker runs; {last}")
    worker = PartHealth("Worker", True, f"{', '.join(sorted(workers))} answered a ping")
    return worker, PartHealth("Beat", False, f"{last}; is celery beat running?")


def _ping_workers() -> list[str]:
    from teimanager.celery import app

    try:
        replies = app.control.ping(timeout=PROBE_TIMEOUT_SECS, limit=1)
    except Exception:
        return []
    return [name for reply in replies or [] for name in reply]


def _check_multiplexer(heartbeat: datetime | None) -> PartHealth:
    tei = settings.TEI
    if not tei.grpc_enabled:
        return PartHealth("Multiplexer", None, "disabled (TEI_MANAGER_GRPC_ENABLED=false)")
    seen = f"; heartbeat {_ago(heartbeat)}" if heartbeat else ""
    if tei.mtls.enabled:
        # A plaintext probe cannot pass mTLS; the heartbeat is the evidence.
        ok = _is_fresh(heartbeat)
        return PartHealth(
            "Multiplexer", ok, f"port {tei.grpc_port} (mTLS){seen or '; no heartbeat'}"
        )
    target = f"127.0.0.1:{tei.grpc_port}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=PROBE_TIMEOUT_SECS
            )
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        return PartHealth("Multiplexer", False, f"{target} does not answer ({code}){seen}")
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return PartHealth("Multiplexer", serving, f"{target} {state}{seen}")


def _is_fresh(seen: datetime | None) -> bool:
    if seen is None:
        return False
    # Three missed ticks (plus slack for a slow one) before a part counts as down.
    limit = 3 * settings.TEI.health_check_interval_secs + 5
    return (timezone.now() - seen).total_seconds() <= limit


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
