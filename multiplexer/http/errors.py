"""Errors of the HTTP data plane, and the three shapes they are written in.

- TEI's routes answer TEI's body `{"error", "error_type"}` with TEI's statuses
  (validation or tokenizer 422, empty 400, overloaded 429, backend 424, unhealthy 503).
- A target's `v1/embeddings` answers as TEI's does: `{"message", "code", "type"}`.
- The top-level OpenAI routes (`/v1/...`) answer OpenAI's
  `{"error": {"message", "type", "param", "code"}}`.

gRPC statuses (the instance's own, or the multiplexer's routing and admission) map onto
TEI's error types the way TEI maps its errors onto gRPC, read backwards.
"""

from __future__ import annotations

import grpc
import orjson
from aiohttp import web
from pydantic import ValidationError

from multiplexer.admission import AdmissionError, Overloaded

# TEI's error types and statuses; NotFound, Unauthorized and Forbidden are the
# multiplexer's own (TEI serves one model, has no targets to miss and one key at most).
STATUS = {
    "Validation": 422,
    "Tokenizer": 422,
    "Empty": 400,
    "Overloaded": 429,
    "Backend": 424,
    "Unhealthy": 503,
    "NotFound": 404,
    "Unauthorized": 401,
    "Forbidden": 403,
}
TEI, TEI_OPENAI, OPENAI = "tei", "tei-openai", "openai"


class HttpError(Exception):
    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        retry_after: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.status = status or STATUS[error_type]
        self.param = param
        self.retry_after = retry_after
        self.code = code  # OpenAI's `code`, where the error type does not say it


def empty(field: str) -> HttpError:
    return HttpError("Empty", f"`{field}` cannot be empty", param=field)


def too_many(count: int, limit: int, field: str) -> HttpError:
    # TEI's own words, as a Validation error (422).
    return HttpError(
        "Validation",
        f"batch size {count} > maximum allowed batch size {limit} (max_client_batch_size)",
        param=field,
    )


def from_validation(exc: ValidationError) -> HttpError:
    """pydantic's complaint, one line per field: `inputs: Input should be a valid string`."""
    problems = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(part) for part in error["loc"])
        problems.append(f"{where}: {error['msg']}" if where else error["msg"])
    first = exc.errors(include_url=False)[0]["loc"] if exc.error_count() else ()
    message = "; ".join(problems)
    if exc.error_count() > 5:
        message += f" (and {exc.error_count() - 5} more)"
    return HttpError("Validation", message, param=str(first[0]) if first else None)


def from_grpc(code: grpc.StatusCode, message: str) -> HttpError:
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return HttpError("Empty" if "cannot be empty" in message else "Validation", message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return HttpError("Overloaded", message, retry_after=Overloaded.retry_after)
    if code is grpc.StatusCode.UNAVAILABLE:
        return HttpError("Unhealthy", message)
    if code is grpc.StatusCode.NOT_FOUND:
        return HttpError("NotFound", message)
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return HttpError("Unauthorized", message)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return HttpError("Forbidden", message)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return HttpError(
            "Backend", message or "the instance did not answer in time", status=504, code="timeout"
        )
    if code is grpc.StatusCode.FAILED_PRECONDITION and message.lower().startswith("tokenizer"):
        return HttpError("Tokenizer", message)
    return HttpError("Backend", message or code.name)


def from_exception(exc: BaseException) -> HttpError | None:
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, AdmissionError):
        error = from_grpc(exc.code, exc.message)
        # A key over its rate limit says when to come back; a full queue says 1 s.
        error.retry_after = getattr(exc, "retry_after", None) or error.retry_after
        return error
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_grpc(exc.code(), exc.details() or "")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return HttpError(
            "Validation",
            f"{(exc.text or 'request body too large').rstrip('.')} (http_payload_limit_bytes)",
            status=413,
            code="payload_too_large",
        )
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        error_type = "NotFound" if exc.status == 404 else "Validation"
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status)
        return HttpError(error_type, exc.reason, status=exc.status, code=code)
    return None


def shape_of(path: str) -> str:
    if path.startswith("/v1/"):
        return OPENAI
    if path.startswith(("/instances/", "/models/")) and path.rstrip("/").endswith("embeddings"):
        return TEI_OPENAI
    return TEI


def render(error: HttpError, shape: str) -> web.Response:
    body: dict[str, object]
    status = error.status
    if shape == OPENAI:
        status = _OPENAI_STATUS.get(status, status)
        body = {
            "error": {
                "message": error.message,
                "type": _OPENAI_TYPE.get(status, "server_error"),
                "param": error.param,
                "code": error.code or _OPENAI_CODE.get(error.error_type),
            }
        }
    elif shape == TEI_OPENAI:
        body = {"message": error.message, "code": status, "type": error.error_type}
    else:
        body = {"error": error.message, "error_type": error.error_type}
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


# OpenAI's API speaks 400 for any bad request, including what TEI calls 422 and 424.
_OPENAI_STATUS = {422: 400, 424: 400}
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_OPENAI_CODE = {
    "Validation": "invalid_value",
    "Tokenizer": "invalid_value",
    "Empty": "empty_input",
    "Overloaded": "rate_limit_exceeded",
    "Backend": "backend_error",
    "Unhealthy": "service_unavailable",
    "NotFound": "model_not_found",
    "Unauthorized": "invalid_api_key",
    "Forbidden": "permission_denied",
}
