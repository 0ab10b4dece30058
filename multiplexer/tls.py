"""mTLS for the multiplexer: server credentials from `[auth.mtls]` and the subject check.

The TLS handshake itself refuses a client without a certificate or with one that the
client CA did not sign. `allowed_subjects` (certificate common names) is checked per call
from the auth context: another subject gets PERMISSION_DENIED, on every service (the
multiplexer, health and reflection alike).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from teimanager.config import MtlsConfig


def server_credentials(mtls: MtlsConfig) -> grpc.ServerCredentials:
    """Server certificate and key, client CA, client certificate required."""
    return grpc.ssl_server_credentials(
        [(_read(mtls.server_key, "server_key"), _read(mtls.server_cert, "server_cert"))],
        root_certificates=_read(mtls.ca_cert, "ca_cert"),
        require_client_auth=True,
    )


def channel_credentials(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> grpc.ChannelCredentials:
    """Client side: trust `ca` (else the system roots) and present `cert`/`key` if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca).read_bytes() if ca else None,
        private_key=Path(key).read_bytes() if key else None,
        certificate_chain=Path(cert).read_bytes() if cert else None,
    )


class SubjectCheck(grpc.aio.ServerInterceptor):
    """Lets a call through only when the client certificate's CN is allowed."""

    def __init__(self, allowed_subjects: Iterable[str]) -> None:
        self.allowed = frozenset(allowed_subjects)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        kind = _handler_kind(handler)
        guarded = self._guard(getattr(handler, kind))
        return handler._replace(**{kind: guarded})  # type: ignore[attr-defined]

    async def check(self, context: grpc.aio.ServicerContext) -> None:
        names = {
            value.decode("utf-8", "replace")
            for value in context.auth_context().get("x509_common_name", [])
        }
        if not names:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "a client certificate with a subject is required"
            )
        if not names & self.allowed:
            subject = ", ".join(sorted(names))
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client certificate subject '{subject}' is not allowed",
            )

    def _guard(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        check = self.check
        if inspect.isasyncgenfunction(behaviour):

            async def guarded_stream(request: Any, context: Any) -> AsyncIterator[Any]:
                await check(context)
                async for item in behaviour(request, context):
                    yield item

            return guarded_stream

        async def guarded(request: Any, context: Any) -> Any:
            await check(context)
            result = behaviour(request, context)
            return await result if inspect.isawaitable(result) else result

        return guarded


def _handler_kind(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _read(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"config key 'auth.mtls.{key}': cannot read {path}: {exc}") from None
