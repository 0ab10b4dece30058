"""The errors a request or a start can fail with, each tied to TEI's gRPC status code."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request failed; `code` is the gRPC status TEI answers with, `kind` the metric label."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION
    kind: str = "backend"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ValidationError(ServingError):
    """Bad input: empty, too long, unknown prompt, bad `dimensions`, too many texts."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    kind = "validation"


class OverloadedError(ServingError):
    """More requests in flight than `--max-concurrent-requests`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    kind = "overloaded"


class UnavailableError(ServingError):
    """The model is not loaded (yet), or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE
    kind = "unhealthy"


class BackendError(ServingError):
    """The model cannot do what was asked (wrong model type) or its forward pass failed."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "backend"


class TokenizerError(ServingError):
    """The tokenizer refused the input."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    kind = "tokenizer"


class StartupError(Exception):
    """The server cannot start: the message is the one line the log shows."""


class UnauthenticatedError(ServingError):
    """`--api-key` is set and the call did not carry it as `authorization: Bearer <key>`."""

    code = grpc.StatusCode.UNAUTHENTICATED
    kind = "unauthorized"
