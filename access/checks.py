"""System checks: access.E001, a listener beyond loopback with auth forced off."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from access import protection
from teimanager.config import is_loopback


@register()
def check_protected_mode(app_configs: Any, **kwargs: Any) -> list[Error]:
    config = settings.TEI
    if config.auth_required != protection.OFF:
        return []
    exposed = [
        f"{what} on {host}" for what, host in protection.listeners(config) if not is_loopback(host)
    ]
    if not exposed:
        return []
    return [
        Error(
            f"TEI_MANAGER_AUTH_REQUIRED=false while {', '.join(exposed)} listens beyond "
            "loopback: anyone who reaches it may change the fleet and use every model.",
            hint="Set TEI_MANAGER_AUTH_REQUIRED=auto (or true) and create a key with "
            "`manage.py apikey create NAME --scope admin`, or bind to 127.0.0.1.",
            id="access.E001",
        )
    ]
