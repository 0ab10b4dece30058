"""The TeiMultiplexer service: every call forwarded to the routed instance's `tei.v1` RPC.

Handlers are generic (no protobuf classes): a wrapper's Target is read by a wire scan, the
inner request bytes go to the instance unchanged and the response bytes come back
unchanged, so a call costs no parse and no re-serialisation. Streams are forwarded as
streams, one message at a time in each direction: the next message is read only once the
previous one was handed on, so gRPC flow control reaches from the instance to the client.
A stream is routed by the target of its first message. An instance's status code and
message reach the client as they are.

Deadlines: a unary call (and an Arrow batch) gets the client's deadline or
`grpc_request_timeout_secs`, whichever is sooner. A stream's length is the client's to
choose, so a stream gets the client's deadline, and `grpc_request_timeout_secs` bounds how
long the instance may stay silent while it owes an answer (a request of a bidirectional
stream not yet answered, or the single answer of a client stream the client has closed):
an instance that makes progress, or a client that pauses, never trips it.

Keys: each call's `authorization: Bearer <key>` (or `x-api-key`) passes the Keyring
(multiplexer/keys.py) before anything else, and routes only to what the key may use. The
client's credentials never reach the instance: it gets its own key, which only the
manager knows; the rest of the client's metadata passes as it came.

Every call ends in `_finish`: Prometheus, the traffic window (with the tokens the
instance's replies report) and, with tracing on, the hop's span (multiplexer/tracing.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2

from multiplexer import arrow
from multiplexer.admission import AdmissionError
from multiplexer.calls import InstanceCalls, StreamSlots
from multiplexer.channels import ChannelPool
from multiplexer.keys import Keyring, bearer
from multiplexer.metrics import UNROUTED, CallMetrics
from multiplexer.routing import Route, Router, RoutingError
from multiplexer.tracing import Hop, HopTracer
from multiplexer.traffic import response_tokens
from multiplexer.wire import Target, WireError, split_wrapper

SERVICE_NAME = "tei_multiplexer.v1.TeiMultiplexer"
# The largest message an instance takes: TEI's gRPC server keeps tonic's default of 4 MiB
# (its --payload-limit is for the HTTP build only), and localtei takes as much. A larger
# request is refused here, naming the limit, instead of reaching the instance to be
# refused there with a transport error.
INSTANCE_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
ARROW_METHODS = ("EmbedArrow", "EmbedSparseArrow")
_HOP_BY_HOP = frozenset({"user-agent", "content-type", "te", "host", "authority"})
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
Metadata = tuple[tuple[str, str | bytes], ...]

Handler = Callable[..., Any]


@dataclass(frozen=True)
class ProxiedMethod:
    name: str
    upstream_path: str
    client_streaming: bool
    server_streaming: bool
    reports_tokens: bool = False  # its response carries tei.v1.Metadata as field 2


def proxied_methods() -> list[ProxiedMethod]:
    """Each TeiMultiplexer method but the Arrow ones, with the tei.v1 method it calls."""
    upstream = {
        method.name: method
        for service in tei_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    service = multiplexer_pb2.DESCRIPTOR.services_by_name["TeiMultiplexer"]
    return [
        ProxiedMethod(
            m.name,
            f"/{upstream[m.name].containing_service.full_name}/{m.name}",
            m.client_streaming,
            m.server_streaming,
            _has_metadata(upstream[m.name].output_type),
        )
        for m in service.methods
        if m.name not in ARROW_METHODS
    ]


def _has_metadata(message: Any) -> bool:
    field = message.fields_by_number.get(2)
    return (
        field is not None
        and field.message_type is not None
        and (field.message_type.full_name == "tei.v1.Metadata")
    )


class Forwarder:
    def __init__(
        self,
        router: Router,
        pool: ChannelPool,
        metrics: CallMetrics,
        request_timeout: float = 30.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        keyring: Keyring | None = None,
        hops: HopTracer | None = None,
    ) -> None:
        self.router = router
        self.keyring = keyring or Keyring()
        self.pool = pool
        self.metrics = metrics
        self.hops = hops  # None: tracing is off
        self.request_timeout = request_timeout
        self.max_message_bytes = max_message_bytes
        self.calls = InstanceCalls(router, pool)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in proxied_methods():
            if method.client_streaming and method.server_streaming:
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self._stream_stream(method)
                )
            elif method.client_streaming:
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    self._stream_unary(method)
                )
            elif not method.server_streaming:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self._unary_unary(method)
                )
            else:
                raise NotImplementedError(f"{method.name}: unary-to-stream is not forwarded")
        handlers["EmbedArrow"] = grpc.unary_unary_rpc_method_handler(self.embed_arrow)
        handlers["EmbedSparseArrow"] = grpc.unary_unary_rpc_method_handler(self.embed_sparse_arrow)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    # Forwarded calls ------------------------------------------------------------------

    def _unary_unary(self, method: ProxiedMethod) -> Handler:
        name, path, tokens = method.name, method.upstream_path, method.reports_tokens

        async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            started = time.perf_counter()
            instance, failure, response = UNROUTED, None, b""
            hop = None if self.hops is None else self.hops.grpc(name, context.invocation_metadata())
            try:
                presented, metadata = _client_metadata(context)
                grant = self.keyring.check(presented)
                target, inner = split_wrapper(request)
                check_size(inner)
                routed = started
                if self.router.needs_start(target, grant):  # an on-demand model, none running
                    await self.router.start(target, context.time_remaining())
                    routed = time.perf_counter()
                timeout = self._deadline(context)
                route = await self.router.acquire(target, timeout, grant)  # may queue
                instance = route.name
                try:
                    response = await self.pool.unary_unary(route.address, path)(
                        inner,
                        timeout=timeout - (time.perf_counter() - routed),
                        metadata=_upstream(metadata, route, hop),
                    )
                finally:
                    self.router.release(route)
            except Exception as exc:
                failure = _failure(context, exc)
            count = response_tokens(response) if tokens and response else 0
            return await self._finish(
                context, instance, name, started, failure, response, hop, count
            )

        return forward

    def _stream_unary(self, method: ProxiedMethod) -> Handler:
        name, path, tokens = method.name, method.upstream_path, method.reports_tokens

        async def forward(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> bytes:
            started = time.perf_counter()
            instance, failure, response = UNROUTED, None, b""
            hop = None if self.hops is None else self.hops.grpc(name, context.invocation_metadata())
            try:
                presented, metadata = _client_metadata(context)
                grant = self.keyring.check(presented)
                incoming = aiter(requests)
                first = await anext(incoming, None)
                if first is None:
                    raise RoutingError(
                        grpc.StatusCode.INVALID_ARGUMENT, "the stream carried no request: no target"
                    )
                target, inner = split_wrapper(first)
                check_size(inner)
                if self.router.needs_start(target, grant):
                    await self.router.start(target, context.time_remaining())
                # One slot for the whole call: the instance answers once, at the end.
                route = await self.router.acquire(target, self._deadline(context), grant)
                instance = route.name
                stream = InnerStream(inner, incoming, answer_per_request=False)
                try:
                    call = self.pool.stream_unary(route.address, path)(
                        stream,
                        timeout=context.time_remaining(),
                        metadata=_upstream(metadata, route, hop),
                    )
                    response = await self._owed_answer(call, stream, route.name)
                finally:
                    self.router.release(route)
                if stream.bad is not None:
                    raise stream.bad
            except Exception as exc:
                failure = _failure(context, exc)
            count = response_tokens(response) if tokens and response else 0
            return await self._finish(
                context, instance, name, started, failure, response, hop, count
            )

        return forward

    def _stream_stream(self, method: ProxiedMethod) -> Handler:
        name, path, tokens = method.name, method.upstream_path, method.reports_tokens

        async def forward(
            requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
        ) -> AsyncIterator[bytes]:
            started = time.perf_counter()
            instance, failure, count = UNROUTED, None, 0
            hop = None if self.hops is None else self.hops.grpc(name, context.invocation_metadata())
            stream: InnerStream | None = None
            call: grpc.aio.StreamStreamCall | None = None
            try:
                presented, metadata = _client_metadata(context)
                grant = self.keyring.check(presented)
                incoming = aiter(requests)
                first = await anext(incoming, None)
                if first is not None:
                    target, inner = split_wrapper(first)
                    check_size(inner)
                    if self.router.needs_start(target, grant):
                        await self.router.start(target, context.time_remaining())
                    route = self.router.choose(target, grant)
                    instance = route.name
                    # A slot per message in flight, taken before each goes out.
                    slots = StreamSlots(self.router, route, lambda: self._deadline(context))
                    stream = InnerStream(inner, incoming, answer_per_request=True, slots=slots)
                    call = self.pool.stream_stream(route.address, path)(
                        stream,
                        timeout=context.time_remaining(),
                        metadata=_upstream(metadata, route, hop),
                    )
                    while (
                        response := await self._owed_answer(call.read(), stream, instance)
                    ) is not grpc.aio.EOF:
                        stream.answered()
                        if tokens:
                            count += response_tokens(response)
                        yield response
                    if stream.bad is not None:
                        raise stream.bad
            except Exception as exc:
                failure = _failure(context, exc)
            finally:
                if stream is not None and stream.slots is not None:
                    stream.slots.give_all()
                if call is not None and not call.done():
                    call.cancel()
            await self._finish(context, instance, name, started, failure, b"", hop, count)

        return forward

    # Arrow batches --------------------------------------------------------------------

    async def embed_arrow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._embed_arrow(DENSE, request, context)

    async def embed_sparse_arrow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return await self._embed_arrow(SPARSE, request, context)

    async def _embed_arrow(
        self, kind: ArrowKind, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        started = time.perf_counter()
        instance, failure, response, count = UNROUTED, None, b"", 0
        hop = (
            None
            if self.hops is None
            else self.hops.grpc(kind.method, context.invocation_metadata())
        )
        try:
            presented, metadata = _client_metadata(context)
            grant = self.keyring.check(presented)
            message = kind.request_type.FromString(request)
            texts = arrow.read_texts(message.arrow_ipc)
            target = _target(message.target)
            if self.router.needs_start(target, grant):
                await self.router.start(target, context.time_remaining())
            route = self.router.choose(target, grant)
            instance = route.name
            if message.noop:  # the instance is not called: nothing to admit
                payload = kind.noop(len(texts))
            else:
                # The rows go as one stream: the instance keeps many in flight and batches
                # them as its queue allows; each row in flight holds an admission slot.
                rows = [check_size(kind.row(text, message)) for text in texts]
                replies = await self.calls.stream(
                    route,
                    kind.upstream_path,
                    rows,
                    self._deadline(context),
                    _upstream(metadata, route, hop),
                )
                count = sum(response_tokens(reply) for reply in replies)
                payload = kind.payload(replies)
            response = self._arrow_reply(payload, kind.response_type)
        except Exception as exc:
            failure = _failure(context, exc)
        return await self._finish(
            context, instance, kind.method, started, failure, response, hop, count
        )

    def _arrow_reply(self, payload: bytes, kind: Any) -> bytes:
        response: bytes = kind(arrow_ipc=payload).SerializeToString()
        if len(response) > self.max_message_bytes:
            raise _TooLarge(
                f"the reply of {len(response)} bytes exceeds the {self.max_message_bytes} byte "
                "limit (grpc_max_message_size_mb); send fewer rows per batch"
            )
        return response

    # Shared ---------------------------------------------------------------------------

    async def _owed_answer(self, answer: Awaitable[Any], stream: InnerStream, instance: str) -> Any:
        """Await the instance's next answer; DEADLINE_EXCEEDED once one is owed and none
        came for `request_timeout` seconds (a wait with nothing owed is not limited)."""
        pending = asyncio.ensure_future(answer)
        began = time.monotonic()  # time spent handing the last answer on is not silence
        try:
            while True:
                silent_since = max(stream.since, began)
                left = self.request_timeout
                if stream.owed:
                    left -= time.monotonic() - silent_since
                done, _ = await asyncio.wait((pending,), timeout=max(left, 0.001))
                if done:
                    return pending.result()
                silent_since = max(stream.since, began)
                if stream.owed and time.monotonic() - silent_since >= self.request_timeout:
                    raise RoutingError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"instance '{instance}' sent no answer for {self.request_timeout:g} s "
                        "(grpc_request_timeout_secs)",
                    )
        finally:
            if not pending.done():
                pending.cancel()

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.request_timeout if remaining is None else min(remaining, self.request_timeout)

    async def _finish(
        self,
        context: grpc.aio.ServicerContext,
        instance: str,
        method: str,
        started: float,
        failure: tuple[grpc.StatusCode, str] | None,
        response: bytes,
        hop: Hop | None = None,
        tokens: int = 0,
    ) -> bytes:
        code = grpc.StatusCode.OK if failure is None else failure[0]
        self.metrics.observe(instance, method, code, time.perf_counter() - started, tokens)
        if hop is not None:
            hop.end_grpc(instance, code, "" if failure is None else failure[1])
        if failure is not None:
            await context.abort(*failure)
        return response


class _TooLarge(Exception):
    pass


def check_size(inner: bytes) -> bytes:
    """`inner`, unless it is larger than an instance takes (RESOURCE_EXHAUSTED)."""
    if len(inner) > INSTANCE_MAX_MESSAGE_BYTES:
        raise _TooLarge(
            f"the request of {len(inner)} bytes is larger than the {INSTANCE_MAX_MESSAGE_BYTES} "
            "bytes (4 MiB) an instance takes in one message: send less per call"
        )
    return inner


class InnerStream:
    """A client's stream as the instance gets it: the inner request of each wrapper (a
    malformed or oversized one, or one refused admission, ends it and is kept in `bad`,
    raised once the call is over), how many answers the instance owes for it, silent since
    when, and the admission slots it holds (bidirectional streams: one per message in
    flight)."""

    __slots__ = ("answer_per_request", "bad", "first", "incoming", "owed", "since", "slots")

    def __init__(
        self,
        first: bytes,
        incoming: AsyncIterator[bytes],
        answer_per_request: bool,
        slots: StreamSlots | None = None,
    ) -> None:
        self.first, self.incoming = first, incoming
        # Bidirectional: one answer per request. Client stream: one, once the client is done.
        self.answer_per_request = answer_per_request
        self.slots = slots
        self.bad: WireError | _TooLarge | AdmissionError | None = None
        self.owed = 0
        self.since = time.monotonic()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            if not await self._admitted():
                return
            self._sent()
            yield self.first
            async for message in self.incoming:
                try:
                    inner = check_size(split_wrapper(message)[1])
                except (WireError, _TooLarge) as exc:
                    self.bad = exc
                    return
                if not await self._admitted():
                    return
                self._sent()
                yield inner
        finally:
            if not self.answer_per_request:
                self._owe()

    def answered(self) -> None:
        self.owed = max(self.owed - 1, 0)
        self.since = time.monotonic()
        if self.slots is not None:
            self.slots.give()

    async def _admitted(self) -> bool:
        if self.slots is None:
            return True
        try:
            await self.slots.take()
        except AdmissionError as exc:
            self.bad = exc
            return False
        return True

    def _sent(self) -> None:
        if self.answer_per_request:
            self._owe()

    def _owe(self) -> None:
        if self.owed == 0:
            self.since = time.monotonic()
        self.owed += 1


@dataclass(frozen=True)
class ArrowKind:
    """What differs between the dense and the sparse Arrow call."""

    method: str
    request_type: Any
    response_type: Any
    upstream_path: str
    row: Callable[[str, Any], bytes]  # (text, Arrow request) -> inner tei.v1 request bytes
    noop: Callable[[int], bytes]
    payload: Callable[[list[bytes]], bytes]  # the instance's replies -> Arrow IPC


DENSE = ArrowKind(
    method="EmbedArrow",
    request_type=multiplexer_pb2.EmbedArrowRequest,
    response_type=multiplexer_pb2.EmbedArrowResponse,
    upstream_path="/tei.v1.Embed/EmbedStream",
    row=lambda text, message: tei_pb2.EmbedRequest(
        inputs=text, truncate=message.truncate, normalize=message.normalize
    ).SerializeToString(),
    noop=arrow.noop_dense,
    payload=lambda replies: arrow.dense_ipc(arrow.dense_from_replies(replies)),
)
SPARSE = ArrowKind(
    method="EmbedSparseArrow",
    request_type=multiplexer_pb2.EmbedSparseArrowRequest,
    response_type=multiplexer_pb2.EmbedSparseArrowResponse,
    upstream_path="/tei.v1.Embed/EmbedSparseStream",
    row=lambda text, message: tei_pb2.EmbedSparseRequest(
        inputs=text, truncate=message.truncate
    ).SerializeToString(),
    noop=arrow.noop_sparse,
    payload=lambda replies: arrow.sparse_ipc(*arrow.sparse_from_replies(replies)),
)


def _target(message: multiplexer_pb2.Target) -> Target:
    which = message.WhichOneof("routing")
    if which == "instance_name":
        return Target(instance_name=message.instance_name)
    if which == "model_id":
        return Target(model_id=message.model_id)
    if which == "instance_index":
        return Target(instance_index=message.instance_index)
    return Target()


def _failure(context: grpc.aio.ServicerContext, exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a failed call ends with; a refusal that says when to come back (a key
    over its rate limit, a full queue) also says it in `retry-after` trailing metadata."""
    retry_after = getattr(exc, "retry_after", None)
    if retry_after:
        context.set_trailing_metadata((("retry-after", str(retry_after)),))
    return _status(exc)


def _status(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, AdmissionError):  # routing failures and admission refusals
        return exc.code, exc.message
    if isinstance(exc, WireError | DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}"
    if isinstance(exc, arrow.ArrowInputError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, _TooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, arrow.InstanceReplyError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"multiplexer error: {type(exc).__name__}: {exc}"


def _client_metadata(context: grpc.aio.ServicerContext) -> tuple[str | None, Metadata]:
    """The key the client presented (`authorization: Bearer`, else `x-api-key`), and the
    rest of its own metadata (a request id, say), without transport headers."""
    presented: str | None = None
    kept: list[tuple[str, str | bytes]] = []
    for key, value in context.invocation_metadata() or ():
        if key in _CREDENTIALS:
            if key == "authorization":
                presented = bearer(value) or presented
            elif presented is None:
                presented = value.decode("latin-1") if isinstance(value, bytes) else value
        elif key not in _HOP_BY_HOP and not key.startswith((":", "grpc-")):
            kept.append((key, value))
    return presented, tuple(kept)


def _upstream(metadata: Metadata, route: Route, hop: Hop | None = None) -> Metadata | None:
    """What goes to the instance: the client's metadata (with tracing on, the hop's trace
    context instead of the client's) and the instance's own key."""
    if hop is not None:
        metadata = hop.forwarded(metadata)
    return (metadata + route.credentials) if metadata else (route.credentials or None)
