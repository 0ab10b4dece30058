"""The Models page: status badges, size on disk, dimensions, download progress, and the
actions download, verify and "create instance" (the instance add form, filled in with
the model's defaults). Registering validates with the API's serializer."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from access.audit import SYSTEM, Actor, client_address
from access.models import ActorKind
from instances.errors import TeiManagerError
from registry import services
from registry.models import Model, ModelStatus
from registry.serializers import ModelCreateSerializer


class ModelRegisterForm(forms.ModelForm):
    """Register a model: POST /models's serializer validates, the service registers."""

    actor: Actor = SYSTEM

    class Meta:
        model = Model
        fields = [
            "model_id",
            "revision",
            "pooling",
            "dtype",
            "on_demand",
            "idle_timeout_secs",
            "evict_idle",
            "max_batch_tokens",
            "max_concurrent_requests",
            "auto_truncate",
        ]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if self.errors:
            return cleaned
        payload = {k: v for k, v in cleaned.items() if v is not None}
        serializer = ModelCreateSerializer(data=payload)
        if not serializer.is_valid():
            for field, problems in serializer.errors.items():
                for problem in problems:
                    self.add_error(field if field in self.fields else None, str(problem))
            return cleaned
        try:
            self.instance = services.register_model(self.actor, **serializer.validated_data)
        except TeiManagerError as exc:
            self.add_error("model_id", exc.message)
        return cleaned

    def _post_clean(self) -> None:
        """No model validation: the serializer above is the only one."""


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    list_display = [
        "model_id",
        "status_badge",
        "progress",
        "size",
        "dimensions",
        "model_type",
        "memory",
        "on_demand",
        "source",
        "create_instance",
    ]
    list_filter = ["status", "source", "on_demand"]
    search_fields = ["model_id"]
    actions = ["download_selected", "verify_selected", "cancel_selected"]
    form = ModelRegisterForm
    readonly_fields = [
        "status_badge",
        "progress",
        "size",
        "dimensions",
        "max_input_length",
        "model_type",
        "load_time_secs",
        "memory",
        "commit_sha",
        "last_error",
        "source",
    ]

    class Media:
        css = {"all": ["instances/admin.css"]}

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False  # a registered model is changed by its tasks only

    def get_form(
        self, request: HttpRequest, obj: Model | None = None, change: bool = False, **kwargs: Any
    ) -> Any:
        kwargs["form"] = type("ModelRegisterForm", (ModelRegisterForm,), {"actor": _actor(request)})
        return super().get_form(request, obj, change, **kwargs)

    def save_model(self, request: HttpRequest, obj: Model, form: Any, change: bool) -> None:
        """Nothing to save: the form registered the model through the service."""

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        self._each(request, [obj], services.delete_model, "Deleted")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        self._each(request, list(queryset), services.delete_model, "Deleted")

    @admin.action(description="Download the selected models")
    def download_selected(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        self._each(request, queryset, services.download_model, "Downloading")

    @admin.action(description="Verify the selected models (load, embed a probe, stop)")
    def verify_selected(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        self._each(request, queryset, services.verify_model, "Verifying")

    @admin.action(description="Cancel the downloads of the selected models")
    def cancel_selected(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        self._each(request, queryset, services.cancel_download, "Cancelling the download of")

    def _each(self, request: HttpRequest, models: Any, service: Any, verb: str) -> None:
        actor = _actor(request)
        for model in models:
            try:
                service(model.model_id, actor)
            except TeiManagerError as exc:
                self.message_user(request, f"{model.model_id}: {exc.message}", messages.ERROR)
            else:
                self.message_user(request, f"{verb} {model.model_id}.", messages.SUCCESS)

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Model) -> SafeString:
        return format_html(
            '<span class="tei-badge tei-badge--{}" title="{}">{}</span>',
            obj.status,
            obj.last_error,
            obj.status,
        )

    @admin.display(description="download")
    def progress(self, obj: Model) -> SafeString:
        if obj.status != ModelStatus.DOWNLOADING:
            return format_html("{}", "—")
        if not obj.bytes_total:
            return mark_safe('<progress class="tei-progress"></progress>')  # noqa: S308 - constant
        return format_html(
            '<progress class="tei-progress" value="{}" max="{}"></progress> {}%',
            obj.bytes_done,
            obj.bytes_total,
            obj.progress_percent,
        )

    @admin.display(description="size on disk", ordering="size_on_disk")
    def size(self, obj: Model) -> str:
        return _bytes(obj.size_on_disk)

    @admin.display(description="memory", ordering="memory_bytes")
    def memory(self, obj: Model) -> str:
        return _bytes(obj.memory_bytes)

    @admin.display(description="")
    def create_instance(self, obj: Model) -> SafeString:
        url = reverse("admin:instances_instance_add") + "?" + urlencode({"model_id": obj.model_id})
        return format_html('<a class="button" href="{}">Create instance</a>', url)


def _bytes(value: int | None) -> str:
    if value is None:
        return "—"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


def _actor(request: HttpRequest) -> Actor:
    user = request.user
    return Actor(ActorKind.USER, user.get_username(), client_address(request.META))
