"""The operator console: the Instance admin.

Instances are immutable, as in the REST API: the admin adds, starts, stops, restarts and
deletes them, always through `instances.services`, so a refusal reads the same here as
there. The add form (instances/forms.py) validates with the API's own serializer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.options import IS_POPUP_VAR
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, get_script_prefix, path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from access import audit
from access.audit import client_address
from access.models import ActorKind
from instances import errors, services
from instances.admin_traffic import COLUMNS as TRAFFIC_COLUMNS
from instances.admin_traffic import TrafficAdminMixin
from instances.forms import InstanceCreateForm
from instances.models import Instance
from instances.templatetags.tei_admin import (
    dashboard_context,
    format_uptime,
    live_value,
    shorten,
    status_badge,
    utc,
)
from nodes.admin import node_badge
from nodes.models import NodeStatus, is_on_down_node, with_node_seen

LOG_TAIL_LINES = 100
EVENTS_SHOWN = 50

admin.site.site_header = "TEI Manager"
admin.site.site_title = "TEI Manager"
admin.site.index_title = "Operator console"
# The sidebar would list three models and take a third of the instance list's width.
admin.site.enable_nav_sidebar = False

# verb -> (service, what the success message says, what a refusal says)
OPERATIONS: dict[str, tuple[Callable[..., Any], str, str]] = {
    "start": (services.start_instance, "Starting", "start"),
    "stop": (services.stop_instance, "Stopping", "stop"),
    "restart": (services.restart_instance, "Restarting", "restart"),
}


class ModelFilter(admin.SimpleListFilter):
    title = "model"
    parameter_name = "model"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        models = Instance.objects.order_by("model_id").values_list("model_id", flat=True)
        return [(m, m) for m in models.distinct()]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Instance]) -> QuerySet[Instance]:
        return queryset.filter(model_id=self.value()) if self.value() else queryset


class GpuFilter(admin.SimpleListFilter):
    title = "GPU"
    parameter_name = "gpu"
    NONE = "none"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        ids = Instance.objects.filter(gpu_id__isnull=False).order_by("gpu_id")
        choices = [(str(i), f"GPU {i}") for i in ids.values_list("gpu_id", flat=True).distinct()]
        return [*choices, (self.NONE, "not pinned")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Instance]) -> QuerySet[Instance]:
        value = self.value()
        if value == self.NONE:
            return queryset.filter(gpu_id__isnull=True)
        if value and value.isdigit():
            return queryset.filter(gpu_id=int(value))
        return queryset


@admin.register(Instance)
class InstanceAdmin(TrafficAdminMixin, admin.ModelAdmin):
    list_display = [
        "name",
        "model_id",
        "port",
        "gpu",
        "node_shown",
        "status_badge",
        "uptime",
        *TRAFFIC_COLUMNS,
        "restarts_live",
        "health_failures_live",
        "last_error_short",
    ]
    list_filter = ["status", ModelFilter, GpuFilter]
    search_fields = ["name", "model_id"]
    search_help_text = "Search by name or model ID."
    list_per_page = 100
    actions = ["start_selected", "stop_selected", "restart_selected", "delete_selected"]
    add_form = InstanceCreateForm
    add_fieldsets = [
        ("Model", {"fields": ["name", "model_id", "pooling"]}),
        ("Placement", {"fields": ["node", "failover", "port", "prometheus_port", "gpu_id"]}),
        (
            "Limits",
            {
                "fields": [
                    "max_batch_tokens",
                    "max_concurrent_requests",
                    "auto_truncate",
                    "startup_timeout_secs",
                    "idle_timeout_secs",
                ]
            },
        ),
        ("Advanced", {"fields": ["extra_args"], "classes": ["collapse"]}),
    ]
    view_fieldsets = [
        (
            "Runtime",
            {
                "fields": [
                    "status_badge",
                    "desired_state_live",
                    "pid_live",
                    "started_at_live",
                    "uptime",
                    "restarts_live",
                    "health_failures_live",
                    "last_health_check_live",
                    "last_error_full",
                ]
            },
        ),
        (
            "Configuration",
            {
                "fields": [
                    "name",
                    "model_id",
                    "pooling_shown",
                    "address",
                    "prometheus_port",
                    "gpu",
                    "max_batch_tokens",
                    "max_concurrent_requests",
                    "auto_truncate",
                    "startup_timeout",
                    "extra_args_shown",
                    "node",
                    "failover",
                    "created",
                ],
                "description": "Instances are immutable: to change one, delete it and add "
                "a new one.",
            },
        ),
    ]
    change_list_template = "admin/instances/instance/change_list.html"
    change_form_template = "admin/instances/instance/change_form.html"

    class Media:
        css = {"all": ["instances/vendor/uplot/uPlot.min.css", "instances/admin.css"]}
        js = [
            "instances/vendor/uplot/uPlot.iife.min.js",
            "instances/charts.js",
            "instances/live.js",
        ]

    # -- permissions: configuration is read-only; operating needs the change permission --

    def has_change_permission(self, request: HttpRequest, obj: Instance | None = None) -> bool:
        return False

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("instances.change_instance")

    # -- pages --

    def get_urls(self) -> list[URLPattern]:
        wrap = self.admin_site.admin_view
        extra = [
            path("dashboard/", wrap(self.dashboard_view), name="instances_instance_dashboard"),
            *self.traffic_urls(),
        ]
        for verb in OPERATIONS:
            extra.append(
                path(
                    f"<path:object_id>/{verb}/",
                    wrap(self.operate_view),
                    {"verb": verb},
                    name=f"instances_instance_{verb}",
                )
            )
        return extra + super().get_urls()

    def get_fieldsets(self, request: HttpRequest, obj: Instance | None = None) -> Any:
        return self.add_fieldsets if obj is None else self.view_fieldsets

    def get_form(
        self, request: HttpRequest, obj: Instance | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = type(
                self.add_form.__name__, (self.add_form,), {"actor": _actor(request)}
            )
        return super().get_form(request, obj, change, **kwargs)

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {"show_save_and_continue": False, **(extra_context or {})}
        return super().add_view(request, form_url, context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        context = dict(extra_context or {})
        obj = self.get_object(request, unquote(object_id))
        if obj is not None:
            prefix = get_script_prefix()
            log = self._log_tail(obj)
            context.update(
                log=log,
                log_text="\n".join(log["lines"]),
                log_tail_lines=LOG_TAIL_LINES,
                events=audit.events(services.SUBJECT, obj.name)[:EVENTS_SHOWN],
                can_operate=self.has_operate_permission(request),
                operations=[("start", "Start"), ("stop", "Stop"), ("restart", "Restart")],
                live_api=f"{prefix}instances",
                live_logs=f"{prefix}instances/{obj.name}/logs?start=-{LOG_TAIL_LINES}",
                chart_panels=self.chart_panels(obj),
            )
        return super().change_view(request, object_id, form_url, context)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        context = {
            "title": "Instances",
            "live_api": f"{get_script_prefix()}instances",
            "live_traffic": reverse("admin:instances_instance_traffic"),
            **(extra_context or {}),
        }
        return super().changelist_view(request, context)

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        return self.with_traffic(super().get_changelist_instance(request))

    def response_add(
        self, request: HttpRequest, obj: Instance, post_url_continue: str | None = None
    ) -> HttpResponse:
        if "_addanother" in request.POST or IS_POPUP_VAR in request.POST:
            return super().response_add(request, obj, post_url_continue)
        self.message_user(
            request, f"Instance “{obj.name}” was added; it is {obj.status}.", messages.SUCCESS
        )
        return HttpResponseRedirect(reverse("admin:instances_instance_change", args=[obj.pk]))

    def save_model(self, request: HttpRequest, obj: Instance, form: Any, change: bool) -> None:
        """Nothing to save: the add form created the instance through the service."""

    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        """The index panels alone, for live.js to swap in."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        return TemplateResponse(request, "admin/instances/dashboard.html", dashboard_context())

    def operate_view(self, request: HttpRequest, object_id: str, verb: str) -> HttpResponse:
        """The Start / Stop / Restart buttons: POST only (admin_view adds CSRF and login)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_operate_permission(request):
            raise PermissionDenied
        obj = self.get_object(request, unquote(object_id))
        if obj is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        self._operate(request, [obj], verb)
        return HttpResponseRedirect(reverse("admin:instances_instance_change", args=[obj.pk]))

    # -- bulk actions --

    @admin.action(description="Start selected instances", permissions=["operate"])
    def start_selected(self, request: HttpRequest, queryset: QuerySet[Instance]) -> None:
        self._report_vanished(request, queryset, "start")
        self._operate(request, queryset, "start")

    @admin.action(description="Stop selected instances", permissions=["operate"])
    def stop_selected(self, request: HttpRequest, queryset: QuerySet[Instance]) -> None:
        self._report_vanished(request, queryset, "stop")
        self._operate(request, queryset, "stop")

    @admin.action(description="Restart selected instances", permissions=["operate"])
    def restart_selected(self, request: HttpRequest, queryset: QuerySet[Instance]) -> None:
        self._report_vanished(request, queryset, "restart")
        self._operate(request, queryset, "restart")

    def delete_model(self, request: HttpRequest, obj: Instance) -> None:
        self._delete(request, [obj])

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Instance]) -> None:
        self._delete(request, queryset)

    def _report_vanished(
        self, request: HttpRequest, queryset: QuerySet[Instance], verb: str
    ) -> None:
        """Selected rows deleted since the list was shown are not in `queryset`: say so,
        rather than act on the rest as if they had never been ticked."""
        selected = set(request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME))
        found = {str(pk) for pk in queryset.values_list("pk", flat=True)}
        gone = len(selected - found)
        if gone:
            what = "instance no longer exists" if gone == 1 else "instances no longer exist"
            self.message_user(
                request,
                f"Cannot {verb}: {gone} selected {what} (deleted meanwhile).",
                messages.ERROR,
            )

    def _operate(self, request: HttpRequest, instances: Iterable[Instance], verb: str) -> None:
        service, doing, refused = OPERATIONS[verb]
        done = []
        for instance in instances:
            try:
                service(instance.name, _actor(request))
            except errors.TeiManagerError as exc:
                self.message_user(request, f"Cannot {refused}: {exc}.", messages.ERROR)
            else:
                done.append(instance.name)
                self.log_change(request, instance, f"Requested {verb}.")
        if done:
            names = ", ".join(done)
            count = f"{len(done)} instance{'s' if len(done) != 1 else ''}"
            self.message_user(request, f"{doing} {count}: {names}.", messages.SUCCESS)

    def _delete(self, request: HttpRequest, instances: Iterable[Instance]) -> None:
        for instance in instances:
            try:
                services.delete_instance(instance.name, _actor(request))
            except errors.TeiManagerError as exc:
                self.message_user(request, f"Cannot delete: {exc}.", messages.ERROR)

    def _log_tail(self, obj: Instance) -> dict[str, Any]:
        try:
            return dict(services.read_logs(obj.name, start=-LOG_TAIL_LINES))
        except (errors.TeiManagerError, OSError) as exc:
            return {"lines": [], "start": 0, "end": 0, "total_lines": 0, "error": str(exc)}

    # -- columns and read-only fields --

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Instance) -> SafeString:
        return status_badge(obj.name, obj.status)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Instance]:
        return with_node_seen(super().get_queryset(request))

    @admin.display(description="node", ordering="node")
    def node_shown(self, obj: Instance) -> SafeString:
        """The node, with a "down" badge while it is (its instance is then unreachable)."""
        if is_on_down_node(obj):
            return format_html("{} {}", obj.node, node_badge(NodeStatus.DOWN))
        return format_html("{}", obj.node)

    @admin.display(description="GPU", ordering="gpu_id")
    def gpu(self, obj: Instance) -> str:
        return "—" if obj.gpu_id is None else str(obj.gpu_id)

    @admin.display(description="uptime", ordering="-started_at")
    def uptime(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "uptime", format_uptime(obj.started_at, obj.status))

    @admin.display(description="restarts", ordering="restarts")
    def restarts_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "restarts", obj.restarts)

    @admin.display(description="health failures", ordering="health_check_failures")
    def health_failures_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "health_check_failures", obj.health_check_failures)

    @admin.display(description="last error")
    def last_error_short(self, obj: Instance) -> SafeString:
        return format_html(
            '<span class="tei-error-text" data-instance="{}" data-field="last_error_short" '
            'title="{}">{}</span>',
            obj.name,
            obj.last_error,
            shorten(obj.last_error) or "—",
        )

    @admin.display(description="last error")
    def last_error_full(self, obj: Instance) -> SafeString:
        return format_html(
            '<span class="tei-last-error" data-instance="{}" data-field="last_error">{}</span>',
            obj.name,
            obj.last_error or "—",
        )

    @admin.display(description="desired state")
    def desired_state_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "desired_state", obj.desired_state)

    @admin.display(description="PID")
    def pid_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "pid", "—" if obj.pid is None else obj.pid)

    @admin.display(description="started")
    def started_at_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "started_at", utc(obj.started_at))

    @admin.display(description="last health check")
    def last_health_check_live(self, obj: Instance) -> SafeString:
        return live_value(obj.name, "last_health_check", utc(obj.last_health_check))

    @admin.display(description="address")
    def address(self, obj: Instance) -> str:
        return obj.address

    @admin.display(description="pooling")
    def pooling_shown(self, obj: Instance) -> str:
        return obj.pooling or "the model's own"

    @admin.display(description="startup timeout")
    def startup_timeout(self, obj: Instance) -> str:
        if obj.startup_timeout_secs is None:
            return f"{settings.TEI.startup_timeout_secs}s (manager default)"
        return f"{obj.startup_timeout_secs}s"

    @admin.display(description="extra arguments")
    def extra_args_shown(self, obj: Instance) -> SafeString:
        if not obj.extra_args:
            return format_html("{}", "—")
        return format_html("<code>{}</code>", " ".join(str(a) for a in obj.extra_args))

    @admin.display(description="created")
    def created(self, obj: Instance) -> str:
        return utc(obj.created_at)


def _actor(request: HttpRequest) -> audit.Actor:
    return audit.Actor(ActorKind.USER, request.user.get_username(), client_address(request.META))
