"""System checks: E001 a `[[models]]` entry of the config file that POST /models would
refuse (`manage.py check`, migrate, runmultiplexer report it before anything starts)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import Error, register

from teimanager.config import ConfigError


@register()
def check_model_entries(app_configs: Any, **kwargs: Any) -> list[Error]:
    from registry.serializers import validate_model_entries

    try:
        validate_model_entries(settings.TEI.models)
    except ConfigError as exc:
        return [
            Error(
                str(exc),
                hint="Each [[models]] table of the config file takes the register API's "
                "fields (POST /models), with the same rules.",
                id="registry.E001",
            )
        ]
    return []
