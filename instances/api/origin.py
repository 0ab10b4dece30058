"""Refuse cross-origin state changes: the check Django's CSRF middleware makes on Origin,
for an API that has no cookie and no token for a browser to carry.

Without it any web page could drive the API from its visitor's browser: a form, or a
`fetch()` with a "simple" content type, reaches the server with no CORS preflight, and
start/stop/restart need no body at all. Browsers label every such request: an `Origin`
header on anything but GET/HEAD, `Sec-Fetch-Site` on everything (current browsers). curl,
python-requests and the like send neither, so scripts keep working with no body and no
extra header; a browser page served by this server (the admin) is same-origin.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.utils.http import is_same_domain
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from instances.errors import CrossOriginRequest

# Sec-Fetch-Site values a browser sends for a request this server's own pages made, or
# one the user typed (`none`).
SAME_SITE_VALUES = ("same-origin", "none")


class SameOriginWrites(BasePermission):
    """Safe methods from anywhere; POST, PUT, PATCH and DELETE only same-origin (or from
    CSRF_TRUSTED_ORIGINS), else 403 CROSS_ORIGIN_REQUEST."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if request.method not in SAFE_METHODS:
            refusal = cross_origin_refusal(request)
            if refusal:
                raise CrossOriginRequest(refusal)
        return True


def cross_origin_refusal(request: Request) -> str | None:
    """Why this request counts as cross-origin, or None when it does not."""
    origin = request.META.get("HTTP_ORIGIN")
    if origin is not None:
        if _trusted_origin(request, origin):
            return None
        return (
            f"requests from origin {origin[:200]!r} may not change state here "
            "(same-origin only; trust another origin with CSRF_TRUSTED_ORIGINS)"
        )
    site = request.META.get("HTTP_SEC_FETCH_SITE")
    if site is None or site in SAME_SITE_VALUES:
        return None
    return f"a {site[:50]} browser request may not change state here (same-origin only)"


def _trusted_origin(request: Request, origin: str) -> bool:
    scheme = "https" if request.is_secure() else "http"
    if origin == f"{scheme}://{request.get_host()}" or origin in settings.CSRF_TRUSTED_ORIGINS:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    for trusted in settings.CSRF_TRUSTED_ORIGINS:  # "https://*.example.com", as Django reads it
        if "*" in trusted:
            pattern = urlsplit(trusted)
            if parsed.scheme == pattern.scheme and is_same_domain(
                parsed.netloc, pattern.netloc.lstrip("*")
            ):
                return True
    return False
