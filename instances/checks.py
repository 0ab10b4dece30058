"""System checks: what is missing or wrong before anything starts (`manage.py check`, migrate)."""

from __future__ import annotations

import importlib.util
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from instances.launch import is_executable
from teimanager.config import ConfigError


@register()
def check_instance_binary(app_configs: Any, **kwargs: Any) -> list[Error | Warning]:
    path = settings.TEI.tei_binary_path
    if is_executable(path):
        return []
    if importlib.util.find_spec("localtei") is not None:
        if path:
            message = f"TEI_BINARY_PATH={path} is not an executable file; localtei is used"
            return [Warning(message, id="instances.W001")]
        return []
    return [
        Error(
            "No instance server: TEI_BINARY_PATH does not point at an executable "
            "text-embeddings-router and the localtei package cannot be imported.",
            hint="Install TEI's gRPC router and set TEI_BINARY_PATH, or run from the "
            "project checkout so that `python -m localtei` works.",
            id="instances.E001",
        )
    ]


@register()
def check_broker(app_configs: Any, **kwargs: Any) -> list[Error]:
    url = settings.CELERY_BROKER_URL
    if url and "://" in url:
        return []
    return [
        Error(
            f"CELERY_BROKER_URL is {'not a URL: ' + repr(url) if url else 'not set'}: "
            "the worker and beat cannot run without a broker.",
            hint="Set CELERY_BROKER_URL, e.g. redis://127.0.0.1:6379/0 (`make redis` starts one).",
            id="instances.E002",
        )
    ]


@register()
def check_seeds(app_configs: Any, **kwargs: Any) -> list[Error]:
    from instances.api.serializers import validate_seeds

    try:
        validate_seeds(settings.TEI.instances)
    except ConfigError as exc:
        return [
            Error(
                str(exc),
                hint="Each [[instances]] table of the config file takes the create API's "
                "fields (POST /instances), with the same rules.",
                id="instances.E003",
            )
        ]
    return []
