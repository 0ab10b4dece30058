"""Register validation and the read representation of a Model. The API, the admin and
the config file's `[[models]]` all validate with `ModelCreateSerializer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

from instances.api.serializers import (
    MAX_INT,
    MODEL_ID_RE,
    MODEL_ID_RULE,
    InstanceCreateSerializer,
    StrictCharField,
    StrictSerializer,
    _first_message,
    model_id_field,
    represent_times,
)
from instances.models import Pooling
from registry.models import Model
from teimanager.config import ConfigError

# The last path segments the API routes as actions (POST /models/{id}/download, ...).
ACTIONS = ("download", "verify", "cancel")
DTYPES = ("float32", "float16", "bfloat16", "int8")


class ModelCreateSerializer(StrictSerializer):
    model_id = model_id_field()
    revision = StrictCharField(
        max_length=255,
        required=False,
        allow_blank=True,
        default="",
        validators=[RegexValidator(MODEL_ID_RE, MODEL_ID_RULE)],
        help_text="Branch, tag or commit a download pins ('' : the default branch).",
    )
    pooling = serializers.ChoiceField(
        choices=Pooling.choices, required=False, allow_null=True, allow_blank=True, default=""
    )
    dtype = serializers.ChoiceField(choices=DTYPES, required=False, allow_blank=True, default="")
    max_batch_tokens = serializers.IntegerField(min_value=1, max_value=MAX_INT, default=16384)
    max_concurrent_requests = serializers.IntegerField(min_value=1, max_value=MAX_INT, default=512)
    auto_truncate = serializers.BooleanField(default=True)
    on_demand = serializers.BooleanField(
        default=False, help_text="Start an instance on the first call that finds none running."
    )
    idle_timeout_secs = serializers.IntegerField(
        min_value=1,
        max_value=MAX_INT,
        required=False,
        allow_null=True,
        default=None,
        help_text="Stop an instance that got no call for this long (null: never).",
    )
    evict_idle = serializers.BooleanField(
        default=False,
        help_text="An on-demand start without memory free first stops the least recently "
        "used on-demand instance.",
    )

    def validate_model_id(self, value: str) -> str:
        value = InstanceCreateSerializer().validate_model_id(value)
        if value.rsplit("/", 1)[-1] in ACTIONS and "/" in value:
            raise serializers.ValidationError(f"must not end in /{value.rsplit('/', 1)[-1]}")
        return value

    def validate_pooling(self, value: str | None) -> str:
        return value or ""


def validate_model_entries(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config file's `[[models]]`, each validated as a register request; ConfigError
    naming the key (`models[1].pooling`) for the first bad one."""
    validated: list[dict[str, Any]] = []
    for index, entry in enumerate(entries):
        serializer = ModelCreateSerializer(data=entry)
        if not serializer.is_valid():
            field = next(iter(serializer.errors))
            key = f"models[{index}]" + ("" if field == "non_field_errors" else f".{field}")
            raise ConfigError(f"config key '{key}': {_first_message(serializer.errors[field])}")
        validated.append(dict(serializer.validated_data))
    return validated


class ModelSerializer(serializers.ModelSerializer):
    pooling = serializers.ChoiceField(choices=Pooling.choices, allow_blank=True, read_only=True)
    progress_percent = serializers.IntegerField(
        read_only=True, allow_null=True, help_text="bytes_done of bytes_total, while known."
    )
    memory_estimate = serializers.IntegerField(
        read_only=True, allow_null=True, help_text="Bytes an instance needs (placement)."
    )

    class Meta:
        model = Model
        fields = [
            "model_id",
            "revision",
            "source",
            "status",
            "pooling",
            "dtype",
            "max_batch_tokens",
            "max_concurrent_requests",
            "auto_truncate",
            "on_demand",
            "idle_timeout_secs",
            "evict_idle",
            "memory_estimate",
            "bytes_done",
            "bytes_total",
            "progress_percent",
            "size_on_disk",
            "commit_sha",
            "dimensions",
            "max_input_length",
            "model_type",
            "load_time_secs",
            "memory_bytes",
            "verified_at",
            "last_error",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Model) -> dict[str, Any]:
        data = {name: getattr(instance, name) for name in self.Meta.fields}
        return represent_times(data, ("verified_at", "created_at", "updated_at"))
