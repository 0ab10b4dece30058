"""Protected mode (Redis's precedent): when a call needs an API key.

`auth_required = "auto"` (the default): while every listener binds loopback only and no
key exists, calls are open, so the loopback quick start needs no key. Once a listener binds
beyond loopback, or any key exists (revoked ones too: revoking the last key does not open
the fleet), every REST call and every data-plane call needs one. "true" and "false" force
it either way.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings

from teimanager.config import Config, is_loopback

AUTO, ON, OFF = "auto", "true", "false"


def listeners(config: Config) -> list[tuple[str, str]]:
    """(what, host) for each listener of the fleet this configuration starts."""
    multiplexer = config.grpc_host or config.bind
    return [("web (TEI_MANAGER_BIND)", config.bind), ("multiplexer", multiplexer)]


def beyond_loopback(hosts: Iterable[str]) -> bool:
    return any(not is_loopback(host) for host in hosts)


def decide(mode: str, open_listener: bool, any_key: bool) -> bool:
    """Whether calls need a key, given the mode and what the fleet looks like."""
    if mode == ON:
        return True
    if mode == OFF:
        return False
    return open_listener or any_key


def required(config: Config | None = None) -> bool:
    """For the control plane: decided now (one query, for whether any key exists)."""
    config = config or settings.TEI
    if config.auth_required != AUTO:
        return config.auth_required == ON
    if beyond_loopback(host for _, host in listeners(config)):
        return True
    from access.models import ApiKey

    return ApiKey.objects.exists()
