"""Who may call the REST API: everyone while the fleet is open (access/protection.py),
else an API key with the admin scope, or a staff user signed in to the admin (changes need
the admin's permission to operate instances, and the CSRF token)."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

from access import protection
from access.models import Scope
from access.rest import KeyHolder

NEEDS_KEY = (
    "an API key is required: send 'Authorization: Bearer <key>' (an admin creates one with "
    "`manage.py apikey create NAME --scope admin`)"
)


class FleetAccess(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user  # authenticates: a key that does not pass is a 401 here
        if not protection.required():
            return True
        if isinstance(user, KeyHolder):
            if not user.key.has_scope(Scope.ADMIN):
                raise exceptions.PermissionDenied(
                    f"API key '{user.key.name}' has no admin scope (it has: "
                    f"{', '.join(user.key.scopes)})"
                )
            return True
        if user is None:
            raise exceptions.NotAuthenticated(NEEDS_KEY)
        if request.method in SAFE_METHODS or user.has_perm("instances.change_instance"):
            return True
        raise exceptions.PermissionDenied(f"user '{user.get_username()}' may not operate instances")
