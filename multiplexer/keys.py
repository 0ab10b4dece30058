"""API keys on the data plane: checked against a cached table, never a query per call.

The refresher thread reads the key rows with the routing table (every 0.5 s, so a revoked
key stops working within a second) and swaps a new immutable `KeyTable` in when any
changed. The hot path (`Keyring.check`, on the event loop) is a dictionary lookup: a
presented key is verified once against its row's SHA-512 hash (djangorestframework-api-
key's hasher, microseconds), and the row it matched is cached under the presented string;
the cache entry counts only while the current table still holds that very row, so a
revoked, expired or edited key is checked afresh against the new table.

Each call also passes the key's scope (inference), its allowed targets (a key limited to
some instances or models routes only to those) and its rate limit (a token bucket per key,
in this process). Last-use times are kept in memory and written by the refresher in one
batch every few seconds.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import grpc
from rest_framework_api_key.crypto import KeyGenerator

from access.keys import may_use, target_pattern
from access.models import Scope
from access.protection import decide
from multiplexer.admission import AdmissionError
from multiplexer.routing import Route, RoutingError, RoutingTable
from multiplexer.wire import Target

CACHE_SIZE = 4096
_VERIFIER = KeyGenerator()
NEEDS_KEY = "an API key is required: send 'authorization: Bearer <key>'"


class KeyRefusal(AdmissionError):
    """A call refused for its key: UNAUTHENTICATED, PERMISSION_DENIED or (over the rate
    limit) RESOURCE_EXHAUSTED with `retry_after` seconds."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after: int | None = None) -> None:
        super().__init__(code, message)
        self.retry_after = retry_after


def unauthenticated(message: str) -> KeyRefusal:
    return KeyRefusal(grpc.StatusCode.UNAUTHENTICATED, message)


def denied(message: str) -> KeyRefusal:
    return KeyRefusal(grpc.StatusCode.PERMISSION_DENIED, message)


@dataclass(frozen=True, eq=False, slots=True)
class KeyEntry:
    """One key as the data plane sees it; the grant a checked call carries."""

    pk: str
    name: str
    prefix: str
    hashed_key: str = field(repr=False)
    inference: bool
    targets: re.Pattern[str] | None  # None: every target
    rate_per_sec: float | None
    burst: float
    expires_at: float | None  # time.monotonic() at which it expires
    revoked: bool

    def may_use(self, route: Route) -> bool:
        return may_use(self.targets, route.name, route.model_id)

    def candidates(self, table: RoutingTable, target: Target) -> tuple[Route, ...]:
        """`table.candidates(target)`, narrowed to what this key may use. A target it may
        not use is PERMISSION_DENIED whether it exists or not: a limited key learns
        nothing about the rest of the fleet."""
        if self.targets is None:
            return table.candidates(target)
        if target.instance_name is not None:
            name = target.instance_name
            route = table.by_name.get(name)
            if not may_use(self.targets, name, route.model_id if route else name):
                raise denied(f"API key '{self.name}' may not use instance '{name}'")
            return table.candidates(target)
        if target.model_id is not None:
            model_id = target.model_id
            if self.targets.fullmatch(model_id):
                return table.candidates(target)
            allowed = [r for r in table.by_model.get(model_id, ()) if self.may_use(r)]
            if not allowed:
                raise denied(f"API key '{self.name}' may not use model '{model_id}'")
            running = tuple(route for route in allowed if route.running)
            if not running:
                raise RoutingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no running instance that API key '{self.name}' may use serves model "
                    f"'{model_id}'",
                )
            return running
        routes = table.candidates(target)  # by index (or no target at all)
        if not self.may_use(routes[0]):
            raise denied(f"API key '{self.name}' may not use {target.describe()}")
        return routes


@dataclass(frozen=True)
class KeyTable:
    """Every key row (revoked ones too), by prefix; `rows` tells two tables apart."""

    rows: tuple[tuple[Any, ...], ...] = ()
    by_prefix: Mapping[str, KeyEntry] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def any_key(self) -> bool:
        return bool(self.rows)

    @classmethod
    def build(cls, rows: Iterable[tuple[Any, ...]]) -> KeyTable:
        rows = tuple(rows)
        now_wall, now_mono = time.time(), time.monotonic()
        entries = {}
        for pk, name, prefix, hashed, scopes, targets, rate, burst, expiry, revoked in rows:
            entries[prefix] = KeyEntry(
                pk=pk,
                name=name,
                prefix=prefix,
                hashed_key=hashed,
                inference=Scope.INFERENCE in scopes,
                targets=target_pattern(targets),
                rate_per_sec=rate or None,
                burst=float(burst or max(rate or 1.0, 1.0)),
                expires_at=None if expiry is None else expiry.timestamp() - now_wall + now_mono,
                revoked=revoked,
            )
        return cls(rows=rows, by_prefix=MappingProxyType(entries))


def load_key_table() -> KeyTable:
    from access.models import ApiKey

    rows = ApiKey.objects.order_by("prefix").values_list(
        "pk", "name", "prefix", "hashed_key", "scopes", "targets", "rate_per_sec", "burst",
        "expiry_date", "revoked",
    )  # fmt: skip
    return KeyTable.build((*row[:4], tuple(row[4]), tuple(row[5]), *row[6:]) for row in rows)


class Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = burst, now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Keyring:
    """The current KeyTable and the per-key state of this process (cache, buckets, last
    use). `check` runs on the event loop only; `update` and `used` may come from the
    refresher thread (one reference swap; one dictionary copy)."""

    def __init__(self, mode: str = "auto", open_listener: bool = False) -> None:
        self.mode = mode
        self.open_listener = open_listener
        self.table = KeyTable()
        self._verified: OrderedDict[str, KeyEntry] = OrderedDict()
        self._buckets: dict[str, Bucket] = {}
        self._last_used: dict[str, float] = {}  # pk -> time.monotonic()

    @property
    def required(self) -> bool:
        return decide(self.mode, self.open_listener, self.table.any_key)

    def update(self, table: KeyTable) -> None:
        self.table = table

    def check(self, presented: str | None) -> KeyEntry | None:
        """The key's grant for one data-plane call, None while the fleet is open (every
        target allowed), or a KeyRefusal."""
        table = self.table
        if not decide(self.mode, self.open_listener, bool(table.rows)):
            return None
        if not presented:
            raise unauthenticated(NEEDS_KEY)
        entry = self._verified.get(presented)
        if entry is not None and table.by_prefix.get(entry.prefix) is entry:
            self._verified.move_to_end(presented)
        else:
            entry = self._verify(presented, table)
        now = time.monotonic()
        if entry.revoked:
            raise unauthenticated(f"API key '{entry.name}' is revoked")
        if entry.expires_at is not None and now >= entry.expires_at:
            raise unauthenticated(f"API key '{entry.name}' expired")
        if not entry.inference:
            raise denied(f"API key '{entry.name}' has no inference scope")
        if entry.rate_per_sec is not None:
            self._take(entry, now)
        self._last_used[entry.pk] = now
        return entry

    def used(self) -> dict[str, float]:
        """pk -> wall-clock time of each key's last call in this process."""
        offset = time.time() - time.monotonic()
        return {pk: stamp + offset for pk, stamp in dict(self._last_used).items()}

    def _verify(self, presented: str, table: KeyTable) -> KeyEntry:
        prefix, dot, _ = presented.partition(".")
        entry = table.by_prefix.get(prefix) if dot else None
        if entry is None or not _VERIFIER.verify(presented, entry.hashed_key):
            raise unauthenticated("invalid API key")
        self._verified[presented] = entry
        if len(self._verified) > CACHE_SIZE:
            self._verified.popitem(last=False)
        return entry

    def _take(self, entry: KeyEntry, now: float) -> None:
        assert entry.rate_per_sec is not None
        bucket = self._buckets.get(entry.pk)
        if bucket is None or (bucket.rate, bucket.burst) != (entry.rate_per_sec, entry.burst):
            bucket = self._buckets[entry.pk] = Bucket(entry.rate_per_sec, entry.burst, now)
        wait = bucket.take(now)
        if wait:
            retry_after = max(1, math.ceil(wait))
            raise KeyRefusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"API key '{entry.name}' is over its rate limit of {entry.rate_per_sec:g} "
                f"calls/s (burst {entry.burst:g}); retry in {retry_after} s",
                retry_after=retry_after,
            )


def bearer(value: str | bytes) -> str | None:
    """The key in an `authorization` value (`Bearer <key>`), else None."""
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if value[:7].lower() == "bearer ":
        return value[7:].strip() or None
    return None
