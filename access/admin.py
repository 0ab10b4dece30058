"""API keys and the audit trail in the admin.

A key is shown once, in the message after it is added (djangorestframework-api-key's
way); afterwards only its prefix. Every add, change, revocation and deletion is recorded
in the audit trail with the staff user who made it.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey

from access import audit, keys
from access.audit import client_address
from access.models import ActorKind, ApiKey, AuditEvent, Scope

# The library registers its own concrete key model; this project's keys are ApiKey.
if admin.site.is_registered(APIKey):
    admin.site.unregister(APIKey)


class ApiKeyForm(forms.ModelForm):
    scopes = forms.MultipleChoiceField(
        choices=Scope.choices,
        widget=forms.CheckboxSelectMultiple,
        help_text="admin: the REST API and every change to the fleet; inference: the data "
        "plane (gRPC and HTTP).",
    )
    targets = forms.CharField(
        required=False,
        help_text="Instance names or model ids, separated by commas or spaces; `*` matches "
        "any characters (`bge-*`, `BAAI/*`). Empty: all.",
    )

    class Meta:
        model = ApiKey
        fields = ["name", "scopes", "targets", "rate_per_sec", "burst", "expiry_date", "revoked"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if "targets" in self.fields and self.instance.pk:
            self.initial["targets"] = ", ".join(self.instance.targets)

    def clean_targets(self) -> list[str]:
        text = self.cleaned_data.get("targets") or ""
        return [part for part in text.replace(",", " ").split() if part]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.instance.pk and self.instance.revoked:
            return data  # every field is read-only
        expires = data.get("expiry_date") if "expiry_date" in self.changed_data else None
        try:
            keys.check_fields(
                data.get("name") or self.instance.name,
                list(data.get("scopes") or []),
                list(data.get("targets") or []),
                data.get("rate_per_sec"),
                data.get("burst"),
                expires,
            )
        except keys.KeyChangeError as exc:
            raise forms.ValidationError(str(exc)) from None
        return data


@admin.register(ApiKey)
class ApiKeyAdmin(APIKeyModelAdmin):
    form = ApiKeyForm
    list_display = [
        "name",
        "prefix",
        "scopes_shown",
        "targets_shown",
        "rate_shown",
        "expiry_date",
        "state",
        "last_used_at",
        "created",
    ]
    list_filter = ["revoked", "created"]
    search_fields = ["name", "prefix"]
    actions = ["revoke_selected"]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> tuple[str, ...]:
        fields = ("prefix", "last_used_at", "created")
        if obj is not None and obj.revoked:
            fields += (
                "name",
                "scopes",
                "targets",
                "rate_per_sec",
                "burst",
                "expiry_date",
                "revoked",
            )
        return fields

    def save_model(
        self, request: HttpRequest, obj: ApiKey, form: Any, change: bool = False
    ) -> None:
        actor = _actor(request)
        if not change:
            with audit.recording(actor, "key.create", keys.SUBJECT, obj.name):
                secret = ApiKey.objects.assign_key(obj)
                obj.save()
            self.message_user(
                request,
                f"The API key “{obj.name}” is: {secret} — store it now: it is not shown again.",
                messages.WARNING,
            )
            return
        revoking = "revoked" in form.changed_data and obj.revoked
        action = "key.revoke" if revoking else "key.change"
        with audit.recording(actor, action, keys.SUBJECT, obj.name):
            obj.save()

    def delete_model(self, request: HttpRequest, obj: ApiKey) -> None:
        with audit.recording(_actor(request), "key.delete", keys.SUBJECT, obj.name):
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for key in queryset:
            self.delete_model(request, key)

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        names = [keys.revoke_key(key.name, _actor(request)).name for key in queryset]
        self.message_user(request, f"Revoked: {', '.join(names)}.", messages.SUCCESS)

    @admin.display(description="scopes")
    def scopes_shown(self, obj: ApiKey) -> str:
        return ", ".join(obj.scopes)

    @admin.display(description="targets")
    def targets_shown(self, obj: ApiKey) -> str:
        return ", ".join(obj.targets) or "all"

    @admin.display(description="rate limit")
    def rate_shown(self, obj: ApiKey) -> str:
        if not obj.rate_per_sec:
            return "—"
        return f"{obj.rate_per_sec:g}/s, burst {obj.burst or obj.rate_per_sec:g}"

    @admin.display(description="state")
    def state(self, obj: ApiKey) -> str:
        if obj.revoked:
            return "revoked"
        return "expired" if obj.has_expired else "active"


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ["at", "who", "address", "action", "subject_kind", "subject", "result", "detail"]
    list_filter = ["subject_kind", "action", "actor_kind", "result"]
    search_fields = ["subject", "actor", "address"]
    date_hierarchy = "at"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


def _actor(request: HttpRequest) -> audit.Actor:
    return audit.Actor(ActorKind.USER, request.user.get_username(), client_address(request.META))
