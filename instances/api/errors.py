"""The one error shape: `{"error", "code", "timestamp"}`, for DRF exceptions, our own,
bad requests Django refuses before any view (handler400: a Host not in ALLOWED_HOSTS, a
body over DATA_UPLOAD_MAX_MEMORY_SIZE), unknown paths (handler404), crashes (handler500),
and what gunicorn refuses before Django (`http_error`: an over-long URL or header)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core import exceptions as django_exceptions
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views import defaults
from rest_framework import exceptions
from rest_framework.response import Response

from instances.api.serializers import iso, validation_error
from instances.errors import (
    BadRequest,
    DisallowedHost,
    Forbidden,
    HeadersTooLarge,
    InternalError,
    MalformedJson,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    TeiManagerError,
    Unauthorized,
    UnsupportedMediaType,
    UriTooLong,
)

log = logging.getLogger(__name__)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    error = as_error(exc)
    if error is None:
        return None  # handler500 renders it
    response = Response(body(error), status=error.status_code)
    auth_header = getattr(exc, "auth_header", None)
    if error.status_code == 401 and auth_header:
        response["WWW-Authenticate"] = auth_header
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
    if isinstance(exc, exceptions.NotAuthenticated | exceptions.AuthenticationFailed):
        # DRF says 403 where no authenticator names a scheme; ours does (Bearer).
        kind = Unauthorized if exc.status_code == 401 else Forbidden
        return kind(str(exc.detail))
    if isinstance(exc, exceptions.PermissionDenied):
        return Forbidden(str(exc.detail))
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return UnsupportedMediaType(f"{exc.detail}; send application/json")
    if isinstance(exc, exceptions.APIException):
        error = TeiManagerError(str(exc.detail))
        error.status_code = exc.status_code
        error.code = str(exc.default_code).upper()
        return error
    return None


def body(error: TeiManagerError) -> dict[str, Any]:
    envelope: dict[str, Any] = {
        "error": error.message,
        "code": error.code,
        "timestamp": iso(timezone.now()),
    }
    if error.details:
        envelope["details"] = error.details
    return envelope


def bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_html_area(request):
        return defaults.bad_request(request, exception or Exception())
    if isinstance(exception, django_exceptions.DisallowedHost):
        error: TeiManagerError = DisallowedHost(str(exception))
    elif isinstance(exception, django_exceptions.RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        error = RequestTooLarge(f"the request body is over {limit} bytes")
    else:
        error = BadRequest()
    return JsonResponse(body(error), status=error.status_code)


# What gunicorn answers itself, before any Django code runs.
_HTTP_ERRORS: dict[int, type[TeiManagerError]] = {
    400: BadRequest,
    413: RequestTooLarge,
    414: UriTooLong,
    431: HeadersTooLarge,
}


def http_error(status: int, message: str) -> dict[str, Any]:
    """The envelope for an error status the HTTP server sends on its own."""
    kind = _HTTP_ERRORS.get(status)
    if kind is not None:
        return body(kind(message or None))
    error = TeiManagerError(message or None)
    error.status_code = status
    error.code = _status_code_name(status)
    return body(error)


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).name
    except ValueError:
        return "HTTP_ERROR"


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
