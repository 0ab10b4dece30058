"""The one error shape: `{"error", "code", "timestamp"}`, for DRF exceptions, our own,
unknown paths (handler404) and crashes (handler500)."""

from __future__ import annotations

import logging
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response

from instances.api.serializers import iso, validation_error
from instances.errors import (
    InternalError,
    MalformedJson,
    MethodNotAllowed,
    NotFound,
    TeiManagerError,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    error = as_error(exc)
    if error is None:
        return None  # handler500 renders it
    response = Response(body(error), status=error.status_code)
    if isinstance(exc, exceptions.MethodNotAllowed):
        view = context.get("view")
        if view is not None:
            response["Allow"] = ", ".join(view.allowed_methods)
    return response


def as_error(exc: Exception) -> TeiManagerError | None:
    if isinstance(exc, TeiManagerError):
        return exc
    if isinstance(exc, exceptions.ParseError):
        return MalformedJson(f"request body is not valid JSON: {exc.detail}")
    if isinstance(exc, exceptions.ValidationError):
        return validation_error(exc.detail)
    if isinstance(exc, exceptions.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail))
    if isinstance(exc, exceptions.NotFound):
        return NotFound(str(exc.detail))
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return UnsupportedMediaType(f"{exc.detail}; send application/json")
    if isinstance(exc, exceptions.APIException):
        error = TeiManagerError(str(exc.detail))
        error.status_code = exc.status_code
        error.code = str(exc.default_code).upper()
        return error
    return None


def body(error: TeiManagerError) -> dict[str, str]:
    return {"error": error.message, "code": error.code, "timestamp": iso(timezone.now())}


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_html_area(request):
        return defaults.page_not_found(request, exception or Exception())
    error = NotFound(f"no such path: {request.method} {request.path}")
    return JsonResponse(body(error), status=error.status_code)


def server_error(request: HttpRequest) -> HttpResponse:
    if _is_html_area(request):
        return defaults.server_error(request)
    return JsonResponse(body(InternalError()), status=500)


def _is_html_area(request: HttpRequest) -> bool:
    return request.path.startswith(("/admin", "/static"))
