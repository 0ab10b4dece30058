"""What the OpenAPI schema says about errors: every one is the envelope
`{"error", "code", "timestamp"}`; each response lists the codes its status carries."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers


class ErrorSerializer(serializers.Serializer):
    error = serializers.CharField(help_text="What went wrong, in words.")
    code = serializers.CharField(help_text="The error code; the response lists its codes.")
    timestamp = serializers.DateTimeField(help_text="When, in UTC (ISO 8601, ending in Z).")
    details = serializers.DictField(
        required=False,
        help_text="Figures to act on, for some codes (INSUFFICIENT_MEMORY: needed_bytes, "
        "free_bytes).",
    )


# What any operation may answer: the Host check and the crash handler run before any view.
_EVERY_OPERATION = {
    400: ["DISALLOWED_HOST", "BAD_REQUEST"],
    405: ["METHOD_NOT_ALLOWED"],
    500: ["INTERNAL_ERROR"],
}
# What an operation behind a key may answer (protected mode: instances.api.permissions).
_KEYED = {401: ["UNAUTHORIZED"], 403: ["FORBIDDEN"]}
# What a POST, PUT or DELETE may answer besides (instances.api.origin).
_STATE_CHANGES = {403: ["CROSS_ORIGIN_REQUEST"]}
# What an operation that reads a JSON body may answer besides (instances.api.parsers).
_JSON_BODY = {400: ["MALFORMED_JSON"], 413: ["REQUEST_TOO_LARGE"], 415: ["UNSUPPORTED_MEDIA_TYPE"]}


def errors(
    codes: dict[int, list[str]] | None = None,
    *,
    changes_state: bool = False,
    body: bool = False,
    keyed: bool = True,
) -> dict[int, OpenApiResponse]:
    """The error responses of one operation: `codes` (status -> codes) plus the ones every
    operation, every operation behind a key, every state change and every JSON body may
    bring."""
    merged: dict[int, list[str]] = {}
    parts = [codes or {}, _EVERY_OPERATION]
    parts += [_KEYED] if keyed else []
    parts += [_STATE_CHANGES] if changes_state else []
    parts += [_JSON_BODY] if body else []
    for part in parts:
        for status, names in part.items():
            merged.setdefault(status, []).extend(n for n in names if n not in merged[status])
    return {
        status: OpenApiResponse(ErrorSerializer, description="Error codes: " + ", ".join(names))
        for status, names in sorted(merged.items())
    }


# Request bodies whose serializer refuses unknown fields (400 "unknown field").
CLOSED_COMPONENTS = ("InstanceCreate",)


def forbid_unknown_fields(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: say `additionalProperties: false` where the
    serializer refuses unknown fields, so the schema promises what the API does."""
    schemas = result.get("components", {}).get("schemas", {})
    for name in CLOSED_COMPONENTS:
        if name in schemas:
            schemas[name]["additionalProperties"] = False
    return result
