"""Keeps the Router's table in step with the Instance rows (and the Keyring's with the API
key rows), says the multiplexer is alive, and writes the traffic roll-up.

A background thread reads the database every `interval` seconds (0.5 s by default, so a
created, stopped or deleted instance is routable or refused within a second, and a revoked
key refused) and swaps a new immutable table in when anything changed. A failed read
keeps the last good tables. Every heartbeat it also writes the keys' last-use times, and
every 10 seconds the traffic samples (multiplexer/rollup.py) in one batch. The thread
keeps its database connection between reads (reopening SQLite each tick costs more than
the read) and drops it only when a read or a write fails.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from django.apps import apps
from django.conf import settings
from django.db import connection
from django.utils import timezone

from multiplexer.keys import Keyring, load_key_table
from multiplexer.routing import Route, Router, RoutingTable

if TYPE_CHECKING:
    from multiplexer.rollup import Rollup

log = logging.getLogger(__name__)

HEARTBEAT_NAME = "multiplexer"
HEARTBEAT_INTERVAL_SECS = 5.0
# How often the instances' last-call times are written (the idle stop reads them).
LAST_CALL_FLUSH_SECS = 2.0


def load_routing_table() -> RoutingTable:
    """Read every instance, whatever its state: a known but stopped one is UNAVAILABLE, and
    so is one on a node that is down; and the models that start on demand. An instance is
    dialled at its node's instance_host (nodes.Node), else at the host its row records."""
    from instances.models import Instance
    from nodes.models import node_addresses

    nodes = node_addresses()
    rows = Instance.objects.values_list(
        "name", "model_id", "host", "port", "status", "max_concurrent_requests", "pooling",
        "auto_truncate", "api_key", "node",
    )  # fmt: skip
    return RoutingTable.build(
        (
            Route(
                name=name,
                model_id=model_id,
                address=dial_address(nodes[node][0] if node in nodes else host, port),
                status=status,
                max_concurrent_requests=limit,
                pooling=pooling,
                auto_truncate=auto_truncate,
                credentials=(("authorization", f"Bearer {key}"),) if key else (),
                node_down=node in nodes and not nodes[node][1],
                node=node,
            )
            for name, model_id, host, port, status, limit, pooling, auto_truncate, key, node in rows
        ),
        on_demand=load_on_demand_models(),
    )


def load_on_demand_models() -> list[str]:
    """The registered models a call may start (all of them with on_demand_default)."""
    try:
        model = apps.get_model("registry", "Model")
    except LookupError:
        return []
    rows = model.objects.all()
    if not settings.TEI.on_demand_default:
        rows = rows.filter(on_demand=True)
    return list(rows.values_list("model_id", flat=True))


def dial_address(host: str, port: int) -> str:
    host = host or "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def record_heartbeat(name: str = HEARTBEAT_NAME) -> bool:
    """Upsert `instances.Heartbeat(name, last_seen)`; False where that model does not exist."""
    try:
        heartbeat = apps.get_model("instances", "Heartbeat")
    except LookupError:
        return False
    heartbeat.objects.update_or_create(name=name, defaults={"last_seen": timezone.now()})
    return True


class RoutingRefresher:
    def __init__(
        self,
        router: Router,
        interval: float = 0.5,
        heartbeat_interval: float | None = HEARTBEAT_INTERVAL_SECS,  # None: write none
        on_change: Callable[[RoutingTable], None] | None = None,
        keyring: Keyring | None = None,
        rollup: Rollup | None = None,
    ) -> None:
        self.router = router
        self.keyring = keyring
        self._written: dict[str, float] = {}  # pk -> the last-use time written
        self._calls_written: dict[str, float] = {}  # instance -> the last-call time written
        self._next_call_flush = 0.0
        self.interval = interval
        self.heartbeat_interval = heartbeat_interval
        self.on_change = on_change
        self.rollup = rollup
        self._stop = threading.Event()
        self._first_read = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_heartbeat = 0.0
        self._failing = False
        # When the read that found the current table began (time.monotonic()): the table
        # reflects every row written before then.
        self.last_read_began = -math.inf

    def start(self, timeout: float = 30.0) -> None:
        """Start the thread; return once its first read is done (or failed)."""
        self._thread = threading.Thread(target=self._run, name="routing-refresher", daemon=True)
        self._thread.start()
        self._first_read.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def refresh_once(self) -> bool:
        """Reload the table; True when it changed."""
        began = time.monotonic()
        try:
            table = load_routing_table()
            if self.keyring is not None:
                keys = load_key_table()
                if keys.rows != self.keyring.table.rows:
                    self.keyring.update(keys)
            if time.monotonic() >= self._next_heartbeat:
                # Every process writes its keys' last use; one writes the heartbeat.
                if self.heartbeat_interval is not None:
                    record_heartbeat()
                self.write_last_used()
                self._next_heartbeat = time.monotonic() + (
                    self.heartbeat_interval or HEARTBEAT_INTERVAL_SECS
                )
            if time.monotonic() >= self._next_call_flush:
                self.write_last_calls()
                self._next_call_flush = time.monotonic() + LAST_CALL_FLUSH_SECS
        except Exception as exc:
            connection.close()  # the next read opens a fresh one
            if not self._failing:
                log.warning("cannot read the instance table, keeping the last one: %s", exc)
            self._failing = True
            return False
        if self._failing:
            log.info("reading the instance table again")
        self._failing = False
        if table == self.router.table:
            self.last_read_began = began
            return False
        self.router.update(table)
        self.last_read_began = began
        if self.on_change is not None:
            self.on_change(table)
        return True

    def write_last_used(self) -> None:
        """One UPDATE per key used since the last write (the data plane never writes per
        call)."""
        if self.keyring is None:
            return
        from access.models import ApiKey

        for pk, stamp in self.keyring.used().items():
            if self._written.get(pk) != stamp:
                moment = datetime.fromtimestamp(stamp, tz=UTC)
                ApiKey.objects.filter(pk=pk).update(last_used_at=moment)
                self._written[pk] = stamp

    def write_last_calls(self) -> int:
        """One UPDATE per instance called since the last write (never one per call);
        returns how many were written."""
        from instances.models import Instance

        written = 0
        for name, stamp in dict(self.router.last_calls).items():
            if self._calls_written.get(name) != stamp:
                moment = datetime.fromtimestamp(stamp, tz=UTC)
                Instance.objects.filter(name=name).update(last_call_at=moment)
                self._calls_written[name] = stamp
                written += 1
        return written

    def roll_up_if_due(self) -> bool:
        """Write the traffic samples when their window is over; True when written."""
        rollup = self.rollup
        if rollup is None or not rollup.due(time.time()):
            return False
        try:
            rollup.run(self.router.table)
        except Exception as exc:
            connection.close()
            log.warning("cannot write the traffic samples: %s", exc)
            return False
        return True

    def _run(self) -> None:
        # Every read happens on this thread, over its one connection, closed on the way out.
        try:
            self.refresh_once()
            self._first_read.set()
            while not self._stop.wait(self.interval):
                self.refresh_once()
                self.roll_up_if_due()
        finally:
            self._first_read.set()
            connection.close()
