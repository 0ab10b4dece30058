"""System checks: what is missing before anything starts (`manage.py check`, migrate, ...)."""

from __future__ import annotations

import importlib.util
from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from instances.process import is_executable


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
