"""Traffic in the operator console: per-instance columns on the list, charts on the instance
page and the index, from the multiplexer's roll-up (telemetry/series.py).

The list shows each instance's newest 10-second sample; live.js redraws those columns
from `traffic/`, and charts.js draws and redraws the charts from `<id>/charts/?window=`
and `fleet-charts/?window=` (15m or 24h), as JSON. Every page needs the view permission.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, JsonResponse
from django.urls import URLPattern, path, reverse
from django.utils.safestring import SafeString

from instances.models import Instance, Status
from instances.templatetags.tei_admin import format_ms, format_rate, live_value
from telemetry import series

COLUMNS = [
    "calls_per_sec",
    "p50",
    "p95",
    "errors_per_sec",
    "queue_depth",
    "tokens_per_sec",
]
CHART_WINDOWS = (("15m", "Last 15 minutes"), ("24h", "Last 24 hours"))

_Admin = admin.ModelAdmin if TYPE_CHECKING else object


class TrafficAdminMixin(_Admin):  # type: ignore[misc,valid-type]
    """For InstanceAdmin: the traffic columns, JSON views and chart settings."""

    def traffic_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        return [
            path("traffic/", wrap(self.traffic_view), name="instances_instance_traffic"),
            path("fleet-charts/", wrap(self.fleet_charts_view), name="instances_fleet_charts"),
            path(
                "<path:object_id>/charts/",
                wrap(self.charts_view),
                name="instances_instance_charts",
            ),
        ]

    def chart_panels(self, obj: Instance) -> list[dict[str, Any]]:
        url = reverse("admin:instances_instance_charts", args=[obj.pk])
        return _panels(url)

    def with_traffic(self, changelist: Any) -> Any:
        """Give each listed instance its current traffic (None: no fresh sample)."""
        current = series.current_traffic()
        for instance in changelist.result_list:
            instance.traffic = current.get(instance.name)
        return changelist

    # -- JSON views --

    def traffic_view(self, request: HttpRequest) -> JsonResponse:
        self._check_view(request)
        current = series.current_traffic()
        return JsonResponse({"instances": {n: t.as_json() for n, t in current.items()}})

    def charts_view(self, request: HttpRequest, object_id: str) -> JsonResponse:
        self._check_view(request)
        window = _window(request)
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return JsonResponse({"error": "no such instance"}, status=404)
        return JsonResponse(series.instance_charts(obj.name, window))

    def fleet_charts_view(self, request: HttpRequest) -> JsonResponse:
        self._check_view(request)
        return JsonResponse(series.fleet_charts(_window(request), Status.values))

    def _check_view(self, request: HttpRequest) -> None:
        if not self.has_view_permission(request):
            raise PermissionDenied

    # -- columns --

    def calls_per_sec(self, obj: Instance) -> SafeString:
        return _live(obj, "calls_per_sec", format_rate)

    def p50(self, obj: Instance) -> SafeString:
        return _live(obj, "p50_ms", format_ms)

    def p95(self, obj: Instance) -> SafeString:
        return _live(obj, "p95_ms", format_ms)

    def errors_per_sec(self, obj: Instance) -> SafeString:
        return _live(obj, "errors_per_sec", format_rate)

    def queue_depth(self, obj: Instance) -> SafeString:
        return _live(obj, "queue_depth", lambda value: "—" if value is None else str(value))

    def tokens_per_sec(self, obj: Instance) -> SafeString:
        return _live(obj, "tokens_per_sec", format_rate)

    calls_per_sec.short_description = "calls/s"  # type: ignore[attr-defined]
    p50.short_description = "p50"  # type: ignore[attr-defined]
    p95.short_description = "p95"  # type: ignore[attr-defined]
    errors_per_sec.short_description = "errors/s"  # type: ignore[attr-defined]
    queue_depth.short_description = "queue"  # type: ignore[attr-defined]
    tokens_per_sec.short_description = "tokens/s"  # type: ignore[attr-defined]


def fleet_chart_panels() -> list[dict[str, Any]]:
    return _panels(reverse("admin:instances_fleet_charts"))


def _panels(url: str) -> list[dict[str, Any]]:
    return [
        {
            "window": name,
            "title": title,
            "url": f"{url}?window={name}",
            "refresh_ms": series.WINDOWS[name].refresh_ms,
        }
        for name, title in CHART_WINDOWS
    ]


def _window(request: HttpRequest) -> series.Window:
    return series.WINDOWS.get(request.GET.get("window", ""), series.WINDOWS["15m"])


def _live(obj: Instance, field: str, shown: Any) -> SafeString:
    traffic = getattr(obj, "traffic", None)
    value = None if traffic is None else getattr(traffic, field)
    return live_value(obj.name, field, shown(value))
