"""How the OpenAPI schema (drf-spectacular) describes the API's credentials."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class ApiKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "access.rest.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key with the admin scope (`manage.py apikey create NAME "
            "--scope admin`), as `Authorization: Bearer <key>` or `X-API-Key: <key>`. Needed "
            "once a listener binds beyond loopback or any key exists (protected mode).",
        }


class AdminSessionScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    target_class = "access.rest.StaffSessionAuthentication"
    name = "adminSession"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "apiKey",
            "in": "cookie",
            "name": "sessionid",
            "description": "A staff user signed in to the admin; changes need the CSRF token.",
        }
