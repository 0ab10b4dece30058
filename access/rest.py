"""The control plane's credentials: an API key (`Authorization: Bearer <key>` or
`X-API-Key`) or a staff user's admin session (CSRF enforced, as DRF does for sessions).

Who may do what is the API's permission class (instances/api/permissions.py); these only
say who is asking. `/metrics` is a plain Django view and asks `metrics_allowed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpRequest
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, SessionAuthentication
from rest_framework.request import Request

from access import audit, keys, protection
from access.audit import client_address
from access.models import ActorKind, ApiKey
from teimanager.config import is_loopback

REALM = 'Bearer realm="tei-manager"'


@dataclass(frozen=True)
class KeyHolder:
    """request.user for a request that presented a valid API key."""

    key: ApiKey
    is_authenticated: bool = True
    is_staff: bool = False

    @property
    def username(self) -> str:
        return self.key.name


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[KeyHolder, ApiKey] | None:
        presented = keys.presented_key(request.META)
        if presented is None:
            return None
        try:
            key = keys.authenticate(presented)
        except keys.KeyRefused as exc:
            if not protection.required():
                return None  # an open fleet ignores credentials (the OpenAI SDK sends some)
            raise exceptions.AuthenticationFailed(str(exc)) from None
        keys.mark_used(key)
        return KeyHolder(key), key

    def authenticate_header(self, request: Request) -> str:
        # Makes DRF answer 401 (not 403) to a request without credentials.
        return REALM


class StaffSessionAuthentication(SessionAuthentication):
    """A staff user signed in to the admin; unsafe methods need the CSRF token."""

    def authenticate(self, request: Request) -> tuple[Any, None] | None:
        user = getattr(request._request, "user", None)
        if user is None or not user.is_active or not user.is_staff:
            return None
        self.enforce_csrf(request)
        return user, None


def actor(request: Request | HttpRequest) -> audit.Actor:
    """Who is asking, for the audit trail: a key, a staff user, or anonymous (open fleet).
    Credentials that do not pass count as anonymous here (the permission refuses them)."""
    address = client_address(request.META)
    try:
        user = request.user
    except exceptions.APIException:
        user = None
    if isinstance(user, KeyHolder):
        return audit.Actor(ActorKind.KEY, user.key.name, address)
    if user is not None and getattr(user, "is_authenticated", False):
        return audit.Actor(ActorKind.USER, user.get_username(), address)
    return audit.Actor(ActorKind.ANONYMOUS, "", address)


def metrics_allowed(request: HttpRequest) -> tuple[int, str] | None:
    """None when this request may read /metrics, else (status, why): open while the fleet
    is, or with metrics_public; from this host (not through a proxy); else with any key."""
    config = settings.TEI
    if config.metrics_public or not protection.required(config):
        return None
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR") or request.META.get("HTTP_FORWARDED")
    if not forwarded and is_loopback(str(request.META.get("REMOTE_ADDR") or "")):
        return None
    presented = keys.presented_key(request.META)
    if presented is None:
        return 401, "an API key is needed to read /metrics from another host"
    try:
        keys.authenticate(presented)
    except keys.KeyRefused as exc:
        return 401, str(exc)
    return None
