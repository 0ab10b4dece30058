"""API keys (scopes, allowed targets, a rate limit) and the audit trail.

A key is `<prefix>.<secret>`: djangorestframework-api-key generates it and keeps only its
SHA-512 hash (the key is 32 random characters, so a fast hash is as safe as a slow one and
costs microseconds to check); the prefix stays visible, to tell keys apart.
"""

from __future__ import annotations

from django.db import models
from django.utils import timezone
from rest_framework_api_key.models import AbstractAPIKey


class Scope(models.TextChoices):
    """admin: the REST API and every change to the fleet; inference: the data plane."""

    ADMIN = "admin"
    INFERENCE = "inference"


class ApiKey(AbstractAPIKey):
    # A name, not a free-form label: `manage.py apikey revoke NAME` finds a key by it.
    name = models.SlugField(
        max_length=50, unique=True, help_text="Names the key in lists, logs and the audit trail."
    )
    scopes = models.JSONField(default=list, help_text="admin, inference, or both.")
    targets = models.JSONField(
        default=list,
        blank=True,
        help_text="Instance names or model ids this key may use; `*` matches any run of "
        "characters. Empty: all.",
    )
    rate_per_sec = models.FloatField(
        null=True, blank=True, help_text="Data-plane calls per second; empty: no limit."
    )
    burst = models.PositiveIntegerField(
        null=True, blank=True, help_text="Calls allowed at once above the rate; default: the rate."
    )
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta(AbstractAPIKey.Meta):
        ordering = ("name",)
        verbose_name = "API key"
        verbose_name_plural = "API keys"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def usable(self) -> bool:
        return not self.revoked and not self.has_expired


class ActorKind(models.TextChoices):
    USER = "user"  # a staff user of the admin
    KEY = "key"  # an API key
    ANONYMOUS = "anonymous"  # an open fleet (protected mode off)
    COMMAND = "command"  # a manage.py command on the host
    SYSTEM = "system"  # the manager itself


class AuditEvent(models.Model):
    """Who changed what, when, from where, and how it ended."""

    at = models.DateTimeField(default=timezone.now)
    actor_kind = models.CharField(max_length=16, choices=ActorKind.choices)
    actor = models.CharField(max_length=150, blank=True)
    address = models.CharField(max_length=64, blank=True)
    action = models.CharField(max_length=32)
    subject_kind = models.CharField(max_length=16)  # "instance" or "api_key"
    subject = models.CharField(max_length=255)
    result = models.CharField(max_length=64)  # "ok", or the error code
    detail = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]
        indexes = [models.Index(fields=["subject_kind", "subject", "-at"])]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.who} {self.action} {self.subject}: {self.result}"

    @property
    def who(self) -> str:
        return f"{self.actor_kind} {self.actor}".strip()
