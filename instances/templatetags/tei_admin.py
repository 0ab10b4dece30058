"""Template helpers for the operator console: status badges, uptimes, the index dashboard.

The same formatting lives in static/instances/live.js, which redraws these values from the
REST API; keep the two in step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django import template
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from instances import dashboard

register = template.Library()

LAST_ERROR_LENGTH = 60


@register.simple_tag
def status_badge(name: str, status: str) -> SafeString:
    """A coloured badge that live.js finds by instance name and redraws."""
    return format_html(
        '<span class="tei-badge tei-badge--{}" data-instance="{}" data-field="status">{}</span>',
        status,
        name,
        status,
    )


@register.simple_tag
def live_value(name: str, field: str, text: Any) -> SafeString:
    """A value (pid, restarts, ...) that live.js keeps current."""
    return format_html('<span data-instance="{}" data-field="{}">{}</span>', name, field, text)


@register.filter
def utc(moment: datetime | None) -> str:
    """One timestamp format everywhere: 2025-01-31 17:04:05 UTC."""
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@register.filter
def gib(size: int) -> str:
    return f"{size / 2**30:.1f}"


def format_rate(per_second: float | None) -> str:
    """Calls, errors or tokens per second: "—" (no sample), "0", "0.4", "37", "12.5k"."""
    if per_second is None:
        return "—"
    if per_second == 0:
        return "0"
    if per_second < 10:
        return f"{per_second:.1f}"
    if per_second < 10_000:
        return f"{per_second:.0f}"
    return f"{per_second / 1000:.1f}k"


def format_ms(ms: float | None) -> str:
    """A latency: "—" (no calls), "0.84 ms", "12.3 ms", "250 ms"."""
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms:.2f} ms"
    if ms < 100:
        return f"{ms:.1f} ms"
    return f"{ms:.0f} ms"


def format_uptime(started_at: datetime | None, status: str) -> str:
    """ "3d 4h", "2h 05m", "7m 12s", "42s"; "—" unless running."""
    if status != "running" or started_at is None:
        return "—"
    seconds = max(0, int((timezone.now() - started_at).total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


def shorten(text: str, length: int = LAST_ERROR_LENGTH) -> str:
    """The first line of `text`, cut to `length` characters with an ellipsis."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= length and line == text.strip() else line[: length - 1] + "…"


@register.simple_tag
def fleet_chart_panels() -> list[dict[str, Any]]:
    """The index's chart windows (charts.js draws them)."""
    from instances.admin_traffic import fleet_chart_panels as panels

    return panels()


@register.inclusion_tag("admin/instances/dashboard.html")
def tei_dashboard() -> dict[str, Any]:
    """The index panels; /admin/instances/instance/dashboard/ renders the same for live.js."""
    return dashboard_context()


def dashboard_context() -> dict[str, Any]:
    summary = dashboard.fleet_summary()
    return {
        "calls_per_sec": format_rate(dashboard.fleet_calls_per_sec()),
        "summary": summary,
        "total": sum(s.count for s in summary),
        "gpus": dashboard.gpu_panel(),
        "health": dashboard.parts_health(),
        "changelist_url": reverse("admin:instances_instance_changelist"),
    }
