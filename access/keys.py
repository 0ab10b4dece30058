"""API keys: create, list, revoke, and check one presented with a request.

The control plane checks a key against the database (one row, found by its prefix); the
data plane checks it against a cached table instead (multiplexer/keys.py), with the same
rules: `target_pattern` for allowed targets, `presented_key` for the headers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from access import audit
from access.models import ApiKey, Scope

SUBJECT = "api_key"
# A target pattern: an instance name or a model id (letters, digits, `-_./:`), with `*`.
_PATTERN = re.compile(r"[A-Za-z0-9._/:*-]{1,255}")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,50}")
BEARER = "bearer "


class KeyChangeError(Exception):
    """A key cannot be created or changed as asked; the message says why."""


class KeyRefused(Exception):
    """A presented key is not accepted: missing, unknown, revoked or expired."""


@dataclass(frozen=True)
class NewKey:
    key: ApiKey
    secret: str  # the whole key: shown once, stored nowhere


def create_key(
    name: str,
    scopes: Iterable[str],
    targets: Iterable[str] = (),
    rate_per_sec: float | None = None,
    burst: int | None = None,
    expires: datetime | None = None,
    actor: audit.Actor = audit.SYSTEM,
) -> NewKey:
    scopes, targets = sorted(set(scopes)), list(dict.fromkeys(targets))
    with audit.recording(actor, "key.create", SUBJECT, name):
        check_fields(name, scopes, targets, rate_per_sec, burst, expires)
        try:
            with transaction.atomic():
                key, secret = ApiKey.objects.create_key(
                    name=name,
                    scopes=scopes,
                    targets=targets,
                    rate_per_sec=rate_per_sec,
                    burst=burst,
                    expiry_date=expires,
                )
        except IntegrityError:
            raise KeyChangeError(f"an API key named '{name}' exists already") from None
    return NewKey(key, secret)


def revoke_key(name: str, actor: audit.Actor = audit.SYSTEM) -> ApiKey:
    """Revoke a key for good (djangorestframework-api-key refuses to undo it)."""
    with audit.recording(actor, "key.revoke", SUBJECT, name):
        key = ApiKey.objects.filter(name=name).first()
        if key is None:
            raise KeyChangeError(f"no API key named '{name}'")
        if not key.revoked:
            key.revoked = True
            key.save(update_fields=["revoked"])
    return key


def check_fields(
    name: str,
    scopes: list[str],
    targets: list[str],
    rate_per_sec: float | None,
    burst: int | None,
    expires: datetime | None,
) -> None:
    if not _NAME.fullmatch(name):
        raise KeyChangeError("a key's name is 1-50 letters, digits, '-' or '_'")
    unknown = [s for s in scopes if s not in Scope.values]
    if not scopes or unknown:
        raise KeyChangeError(f"scopes must be one or more of {', '.join(Scope.values)}")
    for target in targets:
        if not _PATTERN.fullmatch(target):
            raise KeyChangeError(
                f"target {target[:60]!r}: an instance name or a model id, with '*' for any "
                "characters (letters, digits and -_./: only)"
            )
    if rate_per_sec is not None and not rate_per_sec > 0:
        raise KeyChangeError("the rate must be above 0 calls per second")
    if burst is not None and rate_per_sec is None:
        raise KeyChangeError("a burst needs a rate")
    if burst is not None and burst < 1:
        raise KeyChangeError("the burst must be at least 1 call")
    if expires is not None and expires <= timezone.now():
        raise KeyChangeError("the expiry must be in the future")


def target_pattern(targets: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression matching any of `targets` whole (None: no limit)."""
    parts = [".*".join(re.escape(piece) for piece in t.split("*")) for t in targets]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def may_use(pattern: re.Pattern[str] | None, name: str, model_id: str) -> bool:
    """Whether a key limited to `pattern` may use the instance `name` serving `model_id`."""
    return pattern is None or bool(pattern.fullmatch(name) or pattern.fullmatch(model_id))


def presented_key(headers: Mapping[str, Any]) -> str | None:
    """The key a request carries: `Authorization: Bearer <key>`, else `X-API-Key`.
    `headers` is Django's META (HTTP_* names) or a lower-case header mapping."""
    authorization = headers.get("HTTP_AUTHORIZATION", headers.get("authorization"))
    if authorization and authorization[:7].lower() == BEARER:
        return str(authorization[7:].strip()) or None
    key = str(headers.get("HTTP_X_API_KEY", headers.get("x-api-key")) or "").strip()
    return key or None


def authenticate(presented: str) -> ApiKey:
    """The key row `presented` is, or KeyRefused saying why not (never echoing it)."""
    prefix, dot, _ = presented.partition(".")
    key = ApiKey.objects.filter(prefix=prefix).first() if dot else None
    if key is None or not key.is_valid(presented):
        raise KeyRefused("invalid API key")
    if key.revoked:
        raise KeyRefused(f"API key '{key.name}' is revoked")
    if key.has_expired:
        raise KeyRefused(f"API key '{key.name}' expired")
    return key


def mark_used(key: ApiKey, resolution_secs: float = 10.0) -> None:
    """Record that `key` was used now, at most once per `resolution_secs`."""
    now = timezone.now()
    if key.last_used_at is None or (now - key.last_used_at).total_seconds() >= resolution_secs:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
