"""`manage.py apikey create|list|revoke`: API keys from the host's shell.

`create` shows the key once, alone on its last line (`KEY=$(manage.py apikey create ci
--scope inference | tail -n 1)`); only its hash is kept.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from access import audit, keys
from access.models import ApiKey, Scope

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


class Command(BaseCommand):
    help = "Create, list and revoke API keys."

    def add_arguments(self, parser: CommandParser) -> None:
        actions = parser.add_subparsers(
            dest="action", required=True, metavar="{create,list,revoke}"
        )
        create = actions.add_parser("create", help="create a key and print it (once)")
        create.add_argument("name")
        create.add_argument(
            "--scope",
            action="append",
            required=True,
            choices=Scope.values,
            help="admin (the REST API) or inference (the data plane); repeat for both",
        )
        create.add_argument(
            "--targets",
            nargs="+",
            default=[],
            metavar="PATTERN",
            help="instance names or model ids the key may use, `*` for any characters "
            "(quote it); default: all",
        )
        create.add_argument("--rate", type=float, help="data-plane calls per second")
        create.add_argument(
            "--burst", type=int, help="calls at once above the rate (default: the rate)"
        )
        create.add_argument(
            "--expires", help="when it stops working: an ISO date or time (UTC), or 30d, 12h, 2w"
        )
        actions.add_parser("list", help="list the keys (never the keys themselves)")
        revoke = actions.add_parser("revoke", help="revoke a key for good")
        revoke.add_argument("name")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, f"_{options['action']}")(options)
        except keys.KeyChangeError as exc:
            raise CommandError(str(exc)) from None

    def _create(self, options: dict[str, Any]) -> None:
        targets = [t for arg in options["targets"] for t in arg.split(",") if t.strip()]
        new = keys.create_key(
            options["name"],
            options["scope"],
            [t.strip() for t in targets],
            rate_per_sec=options["rate"],
            burst=options["burst"],
            expires=parse_expiry(options["expires"]) if options["expires"] else None,
            actor=audit.Actor.command(),
        )
        self.stdout.write(f"Created API key '{new.key.name}' ({describe(new.key)}).")
        self.stdout.write(
            "Store it now: it is not shown again. Send it as 'Authorization: Bearer <key>'."
        )
        self.stdout.write(new.secret)

    def _list(self, options: dict[str, Any]) -> None:
        rows = [("NAME", "PREFIX", "SCOPES", "TARGETS", "RATE", "EXPIRES", "STATE", "LAST USED")]
        for key in ApiKey.objects.order_by("name"):
            rate = (
                f"{key.rate_per_sec:g}/s burst {key.burst or key.rate_per_sec:g}"
                if key.rate_per_sec
                else "-"
            )
            rows.append(
                (
                    key.name,
                    key.prefix,
                    ",".join(key.scopes),
                    ",".join(key.targets) or "*",
                    rate,
                    _time(key.expiry_date),
                    state(key),
                    _time(key.last_used_at),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            self.stdout.write(
                "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            )

    def _revoke(self, options: dict[str, Any]) -> None:
        key = keys.revoke_key(options["name"], actor=audit.Actor.command())
        self.stdout.write(f"Revoked API key '{key.name}' ({key.prefix}).")


def parse_expiry(text: str) -> datetime:
    match = _DURATION.fullmatch(text.strip())
    if match:
        return timezone.now() + timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise CommandError(
            f"--expires {text!r}: give an ISO date or time (2030-01-31, 2030-01-31T12:00) "
            "or a duration (30d, 12h, 2w)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def describe(key: ApiKey) -> str:
    parts = [f"prefix {key.prefix}", f"scopes {', '.join(key.scopes)}"]
    parts.append(f"targets {', '.join(key.targets)}" if key.targets else "all targets")
    if key.rate_per_sec:
        parts.append(f"{key.rate_per_sec:g} calls/s")
    if key.expiry_date:
        parts.append(f"expires {_time(key.expiry_date)}")
    return "; ".join(parts)


def state(key: ApiKey) -> str:
    if key.revoked:
        return "revoked"
    return "expired" if key.has_expired else "active"


def _time(moment: datetime | None) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M") if moment else "-"
