"""Is the stack alive? The one verdict that `/health` and the admin's health panel show.

Every background process proves it lives by writing a heartbeat (instances/heartbeats.py):

| part | written by | every | stale after |
|---|---|---|---|
| `beat` | celery beat, sending the reconcile tick | health_check_interval_secs | 3 × + 5 s |
| `reconcile` | the tick, run by a worker (beat → broker → worker → database) | same | same |
| `worker.<node>` | each node's worker main process | 5 s | 20 s |
| `multiplexer` | its routing refresher (not judged when gRPC is disabled) | 5 s | 20 s |

A worker is expected on this process's node (creates land there) and on every node that
has instances. A part not seen since this process started (never, or only before) is
*starting* while this process is younger than the part's limit, then *stale*: a stack
that boots together is not reported down while it boots, and a part that never comes up
is reported once its limit has passed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

import psutil
from django.conf import settings
from django.db import connection
from django.utils import timezone

from instances.heartbeats import (
    BEAT,
    MULTIPLEXER,
    RECONCILE,
    WORKER_HEARTBEAT_SECS,
    worker_name,
)
from instances.models import Heartbeat, Instance

log = logging.getLogger(__name__)

STALE_AFTER_MISSED = 3  # heartbeats missed in a row
STALE_SLACK_SECS = 5.0  # for a slow tick or a busy database
MULTIPLEXER_HEARTBEAT_SECS = 5.0  # RoutingRefresher's heartbeat_interval
OK, STALE, STARTING = "ok", "stale", "starting"
PROCESS_STARTED_AT = datetime.fromtimestamp(psutil.Process().create_time(), UTC)


@dataclass(frozen=True)
class Part:
    name: str  # the heartbeat's name: a key of /health's "heartbeats"
    last_seen: datetime | None
    limit_secs: float  # stale when the last heartbeat is older than this
    state: str  # OK, STALE or STARTING


@dataclass(frozen=True)
class Health:
    database_error: str  # "" when the database answered
    parts: tuple[Part, ...]
    heartbeats: dict[str, datetime | None]  # every heartbeat row, and every part judged

    @property
    def ok(self) -> bool:
        return not self.database_error and not self.stale

    @property
    def stale(self) -> list[str]:
        return [part.name for part in self.parts if part.state == STALE]

    @property
    def starting(self) -> list[str]:
        return [part.name for part in self.parts if part.state == STARTING]

    def part(self, name: str) -> Part | None:
        return next((part for part in self.parts if part.name == name), None)


def stale_after(interval_secs: float) -> float:
    return STALE_AFTER_MISSED * interval_secs + STALE_SLACK_SECS


def evaluate(now: datetime | None = None, up_since: datetime | None = None) -> Health:
    """Judge every expected part's heartbeat at `now`, for a process up since `up_since`
    (this one by default). Never raises: a database failure is part of the verdict."""
    now = now or timezone.now()
    up_since = up_since or PROCESS_STARTED_AT
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        seen: dict[str, datetime | None] = dict(Heartbeat.objects.values_list("name", "last_seen"))
        nodes = {settings.NODE_NAME, *Instance.objects.values_list("node", flat=True).distinct()}
    except Exception as exc:
        log.warning("the database does not answer: %s", exc)
        return Health(f"{type(exc).__name__}: {exc}", (), {})
    tick = float(settings.TEI.health_check_interval_secs)
    expected = [(BEAT, tick), (RECONCILE, tick)]
    expected += [(worker_name(node), WORKER_HEARTBEAT_SECS) for node in sorted(nodes)]
    if settings.TEI.grpc_enabled:
        expected.append((MULTIPLEXER, MULTIPLEXER_HEARTBEAT_SECS))
    uptime = (now - up_since).total_seconds()
    parts = []
    for name, interval in expected:
        last = seen.setdefault(name, None)
        limit = stale_after(interval)
        parts.append(Part(name, last, limit, _state(now, last, limit, uptime)))
    return Health("", tuple(parts), dict(sorted(seen.items())))


def _state(now: datetime, last: datetime | None, limit: float, uptime: float) -> str:
    if last is not None and (now - last).total_seconds() <= limit:
        return OK
    return STARTING if uptime <= limit else STALE
