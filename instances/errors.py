"""One exception class per error code. The API renders every one as
`{"error": <message>, "code": <code>, "timestamp": <ISO-8601>}` with its status code."""

from __future__ import annotations

from typing import Any


class TeiManagerError(Exception):
    status_code = 500
    code = "INTERNAL_ERROR"
    default_message = "internal error"

    def __init__(self, message: str | None = None, details: dict[str, Any] | None = None) -> None:
        self.message = message or self.default_message
        # Figures the client can act on (INSUFFICIENT_MEMORY: free and needed bytes); the
        # envelope carries them as "details" when there are any.
        self.details = details
        super().__init__(self.message)


class InstanceNotFound(TeiManagerError):
    status_code = 404
    code = "INSTANCE_NOT_FOUND"
    default_message = "instance not found"


class InstanceExists(TeiManagerError):
    status_code = 409
    code = "INSTANCE_EXISTS"
    default_message = "an instance with this name already exists"


class PortConflict(TeiManagerError):
    status_code = 422
    code = "PORT_CONFLICT"
    default_message = "port is already in use"


class MaxInstancesReached(TeiManagerError):
    status_code = 422
    code = "MAX_INSTANCES_REACHED"
    default_message = "the maximum number of instances is reached"


class ValidationFailed(TeiManagerError):
    status_code = 400
    code = "VALIDATION_ERROR"
    default_message = "invalid request"


class InvalidPort(ValidationFailed):
    code = "INVALID_PORT"
    default_message = "port must be between 1024 and 65535"


class InvalidGpuId(ValidationFailed):
    code = "INVALID_GPU_ID"
    default_message = "no such GPU"


class MalformedJson(ValidationFailed):
    code = "MALFORMED_JSON"
    default_message = "request body is not valid JSON"


class AlreadyRunning(TeiManagerError):
    status_code = 409
    code = "ALREADY_RUNNING"
    default_message = "instance is already running"


class NotRunning(TeiManagerError):
    status_code = 409
    code = "NOT_RUNNING"
    default_message = "instance is not running"


class NodeNotFound(TeiManagerError):
    status_code = 404
    code = "NODE_NOT_FOUND"
    default_message = "no such node"


class NodeDown(TeiManagerError):
    status_code = 409
    code = "NODE_DOWN"
    default_message = "the node is down"


class NotFound(TeiManagerError):
    status_code = 404
    code = "NOT_FOUND"
    default_message = "no such path"


class MethodNotAllowed(TeiManagerError):
    status_code = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "method not allowed"


class UnsupportedMediaType(TeiManagerError):
    status_code = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    default_message = "send the request body as application/json"


class BadRequest(TeiManagerError):
    status_code = 400
    code = "BAD_REQUEST"
    default_message = "the request could not be read"


class DisallowedHost(TeiManagerError):
    status_code = 400
    code = "DISALLOWED_HOST"
    default_message = "this Host is not served here; add it to ALLOWED_HOSTS"


class Unauthorized(TeiManagerError):
    status_code = 401
    code = "UNAUTHORIZED"
    default_message = "an API key is required: send 'Authorization: Bearer <key>'"


class Forbidden(TeiManagerError):
    status_code = 403
    code = "FORBIDDEN"
    default_message = "this API key or user may not do that"


class CrossOriginRequest(TeiManagerError):
    status_code = 403
    code = "CROSS_ORIGIN_REQUEST"
    default_message = "cross-origin requests may not change state"


class RequestTooLarge(TeiManagerError):
    status_code = 413
    code = "REQUEST_TOO_LARGE"
    default_message = "the request body is too large"


class UriTooLong(TeiManagerError):
    status_code = 414
    code = "URI_TOO_LONG"
    default_message = "the request line is too long"


class HeadersTooLarge(TeiManagerError):
    status_code = 431
    code = "HEADERS_TOO_LARGE"
    default_message = "the request headers are too large"


class ModelNotFound(TeiManagerError):
    status_code = 404
    code = "MODEL_NOT_FOUND"
    default_message = "model not found"


class ModelExists(TeiManagerError):
    status_code = 409
    code = "MODEL_EXISTS"
    default_message = "this model is already registered"


class ModelBusy(TeiManagerError):
    status_code = 409
    code = "MODEL_BUSY"
    default_message = "the model is downloading, loading or used by an instance"


class NotDownloading(TeiManagerError):
    status_code = 409
    code = "NOT_DOWNLOADING"
    default_message = "the model is not downloading"


class InsufficientMemory(TeiManagerError):
    status_code = 409
    code = "INSUFFICIENT_MEMORY"
    default_message = "no GPU (or, without one, the host) has the memory this model needs"


class InternalError(TeiManagerError):
    pass
