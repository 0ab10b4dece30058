"""Create validation and the read representation of an Instance.

`InstanceCreateSerializer` holds every create rule; the API and the admin's add form both
use it, so it needs no request. `validation_error()` turns its errors into the one
exception the API renders (INVALID_PORT / INVALID_GPU_ID / VALIDATION_ERROR).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, overload

from django.core.validators import RegexValidator
from django.db import connection
from rest_framework import serializers

from instances import gpu
from instances.errors import InvalidGpuId, InvalidPort, ValidationFailed
from instances.launch import refuse_managed_flags
from instances.models import Instance, Pooling
from nodes.models import down_node_names
from teimanager.config import ConfigError

# \A…\Z, not ^…$: "$" also matches before a trailing newline, and a name names a file.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
NAME_RULE = "must be 1-64 letters, digits, '-' or '_', starting with a letter or digit"
# A model id becomes one argv element: no leading '-' (a flag), no whitespace or control
# characters (validate_model_id also refuses the other unprintable ones).
MODEL_ID_RE = re.compile(r"\A[^\s\x00-\x1f\x7f-\x9f-][^\s\x00-\x1f\x7f-\x9f]*\Z")
MODEL_ID_RULE = "must not start with '-' or contain whitespace or control characters"
MAX_INT = 2**31 - 1  # the range of the integer columns
PORT_MIN, PORT_MAX = 1024, 65535
PORT_RULE = f"must be between {PORT_MIN} and {PORT_MAX}"
GPU_ID_TOO_BIG = f"must be {MAX_INT} or less"


class StrictCharField(serializers.CharField):
    """A string only: 1 or true are not quietly turned into "1" and "True"."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return str(super().to_internal_value(data))


class StrictSerializer(serializers.Serializer):
    """A body that names a field this serializer does not know is refused, not ignored."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["unknown field"]})
        return super().to_internal_value(data)


def model_id_field() -> StrictCharField:
    return StrictCharField(
        min_length=1,
        max_length=255,
        trim_whitespace=False,
        validators=[RegexValidator(MODEL_ID_RE, MODEL_ID_RULE)],
        help_text="A Hugging Face model id (org/name) or a local directory.",
    )


def port_field() -> serializers.IntegerField:
    return serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=PORT_MIN,
        max_value=PORT_MAX,
        error_messages={"min_value": PORT_RULE, "max_value": PORT_RULE},
        help_text="Taken from the configured range when left out.",
    )


class InstanceCreateSerializer(StrictSerializer):
    name = StrictCharField(
        min_length=1,
        max_length=64,
        trim_whitespace=False,
        validators=[RegexValidator(NAME_RE, NAME_RULE)],
        help_text="Letters, digits, '-' and '_', from a letter or digit; names the log file.",
    )
    model_id = model_id_field()
    port = port_field()
    prometheus_port = port_field()
    gpu_id = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=0,
        max_value=MAX_INT,
        error_messages={"min_value": "must be 0 or more", "max_value": GPU_ID_TOO_BIG},
        help_text="Checked against the GPUs NVML reports, where NVML answers.",
    )
    max_batch_tokens = serializers.IntegerField(min_value=1, max_value=MAX_INT, default=16384)
    max_concurrent_requests = serializers.IntegerField(min_value=1, max_value=MAX_INT, default=512)
    pooling = serializers.ChoiceField(
        choices=Pooling.choices, required=False, allow_null=True, allow_blank=True, default=""
    )
    auto_truncate = serializers.BooleanField(default=True)
    startup_timeout_secs = serializers.IntegerField(
        min_value=1, max_value=MAX_INT, required=False, allow_null=True, default=None
    )
    extra_args = serializers.ListField(
        child=StrictCharField(allow_blank=False, trim_whitespace=False, max_length=4096),
        required=False,
        default=list,
        max_length=256,
    )
    node = StrictCharField(
        required=False,
        allow_null=True,
        default=None,
        max_length=255,
        help_text="The node to run it on (GET /nodes); left out: an up node with room.",
    )
    failover = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Start it on another node when its node is down; left out: the config's "
        "failover_default.",
    )
    idle_timeout_secs = serializers.IntegerField(
        min_value=1,
        max_value=MAX_INT,
        required=False,
        allow_null=True,
        default=None,
        help_text="Stop it after this long without a call (null: its model's setting, if any).",
    )

    def validate_model_id(self, value: str) -> str:
        if not value.strip():
            raise serializers.ValidationError("must not be empty")
        if value.startswith("-"):
            raise serializers.ValidationError("must not start with '-'")
        if any(ch.isspace() or not ch.isprintable() for ch in value):
            raise serializers.ValidationError("must not contain whitespace or control characters")
        return value

    def validate_gpu_id(self, value: int | None) -> int | None:
        if value is None:
            return None
        count = gpu.device_count()
        if count is not None and value >= count:
            raise serializers.ValidationError(f"no GPU {value}: this host has {count} GPU(s)")
        return value

    def validate_pooling(self, value: str | None) -> str:
        return value or ""

    def validate_extra_args(self, value: list[str]) -> list[str]:
        if any("\x00" in arg for arg in value):
            raise serializers.ValidationError("must not contain NUL characters")
        refusal = refuse_managed_flags(value)
        if refusal is not None:
            raise serializers.ValidationError(refusal)
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        port, prometheus_port = attrs.get("port"), attrs.get("prometheus_port")
        if port is not None and port == prometheus_port:
            raise serializers.ValidationError({"prometheus_port": ["must differ from port"]})
        return attrs


# Which exception a field's error becomes; every other field gives VALIDATION_ERROR.
_FIELD_ERRORS = {"port": InvalidPort, "prometheus_port": InvalidPort, "gpu_id": InvalidGpuId}


def validation_error(errors: Any) -> ValidationFailed:
    """The API exception for a serializer's `.errors` (a dict of field -> messages)."""
    if not isinstance(errors, dict) or not errors:
        return ValidationFailed(_first_message(errors) or "invalid request")
    field = next(iter(errors))
    message = _first_message(errors[field])
    kind = _FIELD_ERRORS.get(field, ValidationFailed)
    if field == "non_field_errors":
        return kind(message)
    return kind(f"{field}: {message}")


def validate_seeds(seeds: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The config file's `[[instances]]`, each validated as a create request; ConfigError
    naming the key (`instances[1].auto_truncate`) for the first bad one."""
    validated: list[dict[str, Any]] = []
    first_index: dict[str, int] = {}
    for index, seed in enumerate(seeds):
        serializer = InstanceCreateSerializer(data=seed)
        if not serializer.is_valid():
            field = next(iter(serializer.errors))
            key = f"instances[{index}]" + ("" if field == "non_field_errors" else f".{field}")
            message = _first_message(serializer.errors[field])
            raise ConfigError(f"config key '{key}': {message}")
        name = serializer.validated_data["name"]
        if name in first_index:
            raise ConfigError(
                f"config key 'instances[{index}].name': '{name}' is also the name of "
                f"instances[{first_index[name]}]"
            )
        first_index[name] = index
        validated.append(dict(serializer.validated_data))
    return validated


def _first_message(detail: Any) -> str:
    if isinstance(detail, dict):
        return _first_message(next(iter(detail.values()), ""))
    if isinstance(detail, list):
        return _first_message(detail[0]) if detail else ""
    return str(detail)


class InstanceSerializer(serializers.ModelSerializer):
    # Declared, not derived: a read-only model field loses allow_blank, and "" (the model's
    # own pooling) belongs in the schema's enum.
    pooling = serializers.ChoiceField(choices=Pooling.choices, allow_blank=True, read_only=True)
    reachable = serializers.BooleanField(
        read_only=True,
        help_text="false while its node is down (GET /nodes): it is not served, whatever "
        "its status says.",
    )

    class Meta:
        model = Instance
        fields = [
            "name",
            "model_id",
            "host",
            "port",
            "prometheus_port",
            "gpu_id",
            "max_batch_tokens",
            "max_concurrent_requests",
            "pooling",
            "auto_truncate",
            "startup_timeout_secs",
            "extra_args",
            "idle_timeout_secs",
            "on_demand",
            "node",
            "failover",
            "desired_state",
            "status",
            "pid",
            "started_at",
            "restarts",
            "health_check_failures",
            "last_health_check",
            "last_error",
            "last_call_at",
            "created_at",
            "updated_at",
            "reachable",
        ]
        read_only_fields = fields

    def to_representation(self, instance: Instance) -> dict[str, Any]:
        data = represent({name: getattr(instance, name) for name in _MODEL_FIELDS})
        data["reachable"] = instance.node not in down_node_names()
        return data


def list_instances_json() -> str:
    """Every instance as InstanceSerializer shows it, as one JSON array. GET /instances
    lists hundreds: on SQLite the database builds the JSON itself."""
    down = sorted(down_node_names())
    if connection.vendor != "sqlite":
        rows = Instance.objects.values(*_MODEL_FIELDS)
        listed = [{**represent(row), "reachable": row["node"] not in down} for row in rows]
        return json.dumps(listed, separators=(",", ":"))
    columns = []
    for name in _MODEL_FIELDS:
        if name in _DATETIME_FIELDS:  # stored as "YYYY-MM-DD HH:MM:SS[.ffffff]" in UTC
            value = f"replace({name}, ' ', 'T') || 'Z'"
        elif name in ("auto_truncate", "failover", "on_demand"):
            value = f"json(CASE WHEN {name} THEN 'true' ELSE 'false' END)"
        elif name == "extra_args":
            value = f"json({name})"
        else:
            value = name
        columns.append(f"'{name}', {value}")
    # Unreachable: on a registered node that is down (REST row field "reachable").
    marks = ", ".join("%s" for _ in down)
    on_down_node = f"node IN ({marks})" if down else "0"
    columns.append(f"'reachable', json(CASE WHEN {on_down_node} THEN 'false' ELSE 'true' END)")
    table = Instance._meta.db_table
    query = f"SELECT json_group_array(json_object({', '.join(columns)})) FROM "  # noqa: S608
    query += f"(SELECT * FROM {table} ORDER BY name)"
    with connection.cursor() as cursor:
        cursor.execute(query, down)
        return str(cursor.fetchone()[0])


def represent(data: dict[str, Any]) -> dict[str, Any]:
    return represent_times(data, _DATETIME_FIELDS)


def represent_times(data: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    for name in names:
        data[name] = iso(data[name])
    return data


# The columns of a row; "reachable" is derived from the node registry.
_MODEL_FIELDS = [name for name in InstanceSerializer.Meta.fields if name != "reachable"]
_DATETIME_FIELDS = (
    "started_at",
    "last_health_check",
    "last_call_at",
    "created_at",
    "updated_at",
)


@overload
def iso(value: datetime) -> str: ...
@overload
def iso(value: datetime | None) -> str | None: ...
def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with a Z, as every time in the API is written."""
    if value is None:
        return None
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class LogsSerializer(serializers.Serializer):
    lines = serializers.ListField(child=serializers.CharField())
    start = serializers.IntegerField()
    end = serializers.IntegerField()
    total_lines = serializers.IntegerField()
