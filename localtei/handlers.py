"""Method handlers built from a service's descriptor, which answer a request that does not
parse with INVALID_ARGUMENT.

With the generated `add_*Servicer_to_server`, a request grpc cannot parse fails a unary
call with UNKNOWN and the exception's class in the message, and ends a stream as if the
client had closed it (OK, answers missing). Here a request that does not parse becomes a
`Malformed` value: a unary call is refused with INVALID_ARGUMENT before the servicer
sees it; in a stream of requests, the servicer's request iterator raises `stream_error`
(a servicer that answers its own errors, after the answers it owes) or aborts the call
with INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse; `message` says why, for the client."""

    message: str


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    stream_error: Callable[[str], Exception] | None = None,
) -> None:
    """Serve `service`'s methods with `servicer`'s coroutines of the same names."""
    handlers = {method.name: _handler(servicer, method, stream_error) for method in service.methods}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def add_health_and_reflection(
    server: grpc.aio.Server, health: HealthServicer, service_names: tuple[str, ...]
) -> None:
    """grpc.health.v1 with `health`, and server reflection listing `service_names`."""
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    add_servicer(server, health, health_service)
    names = (*service_names, health_service.full_name, reflection.SERVICE_NAME)
    add_servicer(
        server,
        reflection.aio.ReflectionServicer(names),
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    )


def _handler(
    servicer: object, method: MethodDescriptor, stream_error: Callable[[str], Exception] | None
) -> grpc.RpcMethodHandler:
    behaviour = getattr(servicer, method.name)
    parse = _parser(method)
    serialize = GetMessageClass(method.output_type).SerializeToString
    if method.client_streaming:
        wrapped = (
            _request_stream_stream(behaviour, stream_error)
            if method.server_streaming
            else _request_stream(behaviour, stream_error)
        )
        make = (
            grpc.stream_stream_rpc_method_handler
            if method.server_streaming
            else grpc.stream_unary_rpc_method_handler
        )
    else:
        wrapped = _unary_request_stream(behaviour) if method.server_streaming else _unary(behaviour)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
    handler: grpc.RpcMethodHandler = make(
        wrapped, request_deserializer=parse, response_serializer=serialize
    )
    return handler


def _parser(method: MethodDescriptor) -> Callable[[bytes], Any]:
    request_class = GetMessageClass(method.input_type)
    name = method.input_type.full_name

    def parse(data: bytes) -> Any:
        try:
            return request_class.FromString(data)
        except DecodeError as exc:
            # "Error parsing message with type 'X': <why>": keep the why.
            why = str(exc).rsplit(": ", 1)[-1] or "not a protobuf message"
            return Malformed(f"malformed request: not a valid {name} ({why})")

    return parse


def _unary(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behaviour(request, context)

    return call


def _unary_request_stream(behaviour: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for response in behaviour(request, context):
            yield response

    return call


def _request_stream(
    behaviour: Callable[..., Any], error: Callable[[str], Exception] | None
) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_checked(requests, context, error), context)

    return call


def _request_stream_stream(
    behaviour: Callable[..., Any], error: Callable[[str], Exception] | None
) -> Callable[..., Any]:
    async def call(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for response in behaviour(_checked(requests, context, error), context):
            yield response

    return call


async def _checked(
    requests: AsyncIterator[Any],
    context: grpc.aio.ServicerContext,
    error: Callable[[str], Exception] | None,
) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Malformed):
            if error is not None:
                raise error(request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        yield request
