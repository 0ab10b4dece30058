"""The Nodes page: every registered node, up or down, read-only (workers write the rows)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from nodes.models import Node


def node_badge(status: str) -> SafeString:
    return format_html('<span class="tei-badge tei-badge--{}">{}</span>', status, status)


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "name",
        "status_badge",
        "instance_host",
        "ports",
        "instances",
        "gpus_shown",
        "cpu_count",
        "ram",
        "version",
        "last_seen",
    ]
    search_fields = ["name", "instance_host"]
    fields = [
        "name",
        "status_badge",
        "instance_host",
        "ports",
        "prometheus_ports",
        "instances",
        "gpus_shown",
        "cpu_count",
        "ram",
        "version",
        "registered_at",
        "last_seen",
    ]
    readonly_fields = fields

    class Media:
        css = {"all": ["instances/admin.css"]}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Node]:
        return Node.objects.with_instance_counts()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Node | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Node | None = None) -> bool:
        return False

    @admin.display(description="status")
    def status_badge(self, obj: Node) -> SafeString:
        return node_badge(obj.status)

    @admin.display(description="instance ports")
    def ports(self, obj: Node) -> str:
        return f"{obj.port_start}–{obj.port_end}"

    @admin.display(description="Prometheus ports")
    def prometheus_ports(self, obj: Node) -> str:
        return f"{obj.prometheus_port_start}–{obj.prometheus_port_end}"

    @admin.display(description="instances", ordering="instance_count")
    def instances(self, obj: Node) -> int:
        return int(getattr(obj, "instance_count", 0))

    @admin.display(description="GPUs (free / total GiB)")
    def gpus_shown(self, obj: Node) -> SafeString:
        if not obj.gpus:
            return format_html("{}", "—")
        return format_html_join(
            ", ",
            "{}: {} {:.1f} / {:.1f}",
            (
                (
                    gpu.get("index"),
                    gpu.get("name", ""),
                    int(gpu.get("memory_free_bytes", 0)) / 2**30,
                    int(gpu.get("memory_total_bytes", 0)) / 2**30,
                )
                for gpu in obj.gpus
            ),
        )

    @admin.display(description="RAM (GiB)", ordering="ram_bytes")
    def ram(self, obj: Node) -> str:
        return f"{obj.ram_bytes / 2**30:.1f}"
