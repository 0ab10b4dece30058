"""The audit trail: who (a user, a key, a command), when, from which address, what, and
with what result. Lifecycle changes (instances/services.py) and key changes
(access/keys.py) write it; the instance's admin page and GET /instances/{name}/events
read it."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from django.db.models import QuerySet

from access.models import ActorKind, AuditEvent
from teimanager.config import is_loopback

OK = "ok"


@dataclass(frozen=True)
class Actor:
    kind: str
    name: str = ""
    address: str = ""

    @classmethod
    def command(cls) -> Actor:
        """Whoever runs a manage.py command on this host."""
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = ""
        return cls(ActorKind.COMMAND, user, "local")


SYSTEM = Actor(ActorKind.SYSTEM, "tei-manager")


def record(
    actor: Actor, action: str, subject_kind: str, subject: str, result: str = OK, detail: str = ""
) -> AuditEvent:
    return AuditEvent.objects.create(
        actor_kind=actor.kind,
        actor=actor.name[:150],
        address=actor.address[:64],
        action=action,
        subject_kind=subject_kind,
        subject=subject[:255],
        result=result[:64],
        detail=detail,
    )


@contextmanager
def recording(
    actor: Actor,
    action: str,
    subject_kind: str,
    subject: str,
    unrecorded: tuple[type[Exception], ...] = (),
) -> Iterator[None]:
    """Record the change made inside the block: "ok", or the code of the error it raised
    (a TeiManagerError's `code`, else the exception's class name), which goes on. An
    `unrecorded` error (the subject does not exist: nothing was there to change) is not."""
    try:
        yield
    except unrecorded:
        raise
    except Exception as exc:
        code = getattr(exc, "code", None)
        result = code if isinstance(code, str) else type(exc).__name__
        record(actor, action, subject_kind, subject, result, getattr(exc, "message", str(exc)))
        raise
    record(actor, action, subject_kind, subject)


def events(subject_kind: str, subject: str) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(subject_kind=subject_kind, subject=subject)


def client_address(meta: dict[str, Any]) -> str:
    """The client's address: the peer's, or, when the peer is a proxy on this host (nginx,
    docker/nginx.conf), the address the proxy appended last to X-Forwarded-For (an earlier
    entry is the client's own word, and may be anything)."""
    peer = str(meta.get("REMOTE_ADDR") or "")
    forwarded = str(meta.get("HTTP_X_FORWARDED_FOR") or "")
    if forwarded and is_loopback(peer):
        last = forwarded.split(",")[-1].strip()
        if last:
            return last[:64]
    return peer
