"""The HTTP server of the data plane: aiohttp on the multiplexer's own event loop.

aiohttp parses HTTP (its C parser), pydantic validates the bodies; the handlers here only
route, call TeiApi / OpenAIApi and write JSON (orjson: numpy float32 vectors go out as
TEI writes them, shortest float32 digits). A client that disconnects cancels its handler,
and with it the calls it has in flight to the instance.

Every route but `/health` and the docs checks the request's key first (`Authorization:
Bearer <key>` or `X-API-Key`, multiplexer/keys.py), before its body is read; the client's
credentials never reach an instance, which gets its own key instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from multiplexer.channels import ChannelPool
from multiplexer.http import openapi, schemas
from multiplexer.http.errors import HttpError, from_exception, render, shape_of
from multiplexer.http.openai import OpenAIApi, resolve
from multiplexer.http.tei import Answer, Call, Header, TeiApi, parse
from multiplexer.keys import KeyEntry, Keyring, bearer
from multiplexer.metrics import UNROUTED, HttpMetrics
from multiplexer.routing import Router
from multiplexer.tracing import Hop, HopTracer
from multiplexer.traffic import Traffic
from multiplexer.wire import Target
from telemetry.logs import REQUEST_ID, REQUEST_ID_HEADER, accepted_request_id, new_request_id

log = logging.getLogger(__name__)

TARGETS = (("/instances/{name}", "name"), ("/models/{model_id:.+}", "model_id"))
CLIENT_CLOSED = 499  # the client went away first (nginx's convention)
_JSON = "application/json"
# The request's key, as Keyring.check returns it (None: an open fleet).
GRANT: web.RequestKey[KeyEntry | None] = web.RequestKey("grant")
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs"})
# As gRPC metadata to the instance: W3C trace context (replaced by the hop's own when
# tracing is on). The client's credentials never go on: the instance gets its own key.
_FORWARDED_HEADERS = ("traceparent", "tracestate")
CALL = web.RequestKey("call", Call)  # once routed: the instance, the tokens it reported
REQUEST = web.RequestKey("request_id", str)  # the client's X-Request-ID, or a new one
HOP = web.RequestKey("hop", Hop)  # with tracing on

Run = Callable[[TeiApi, Call, Any], Awaitable[Answer]]


@dataclass(frozen=True)
class Operation:
    """One of TEI's routes under a target: `{target}/{path}`."""

    method: str
    path: str
    body: type[schemas.Body] | None
    run: Run
    summary: str


TEI_OPERATIONS = (
    Operation("GET", "info", None, lambda api, call, _: api.info(call), "The instance's info"),
    Operation("GET", "health", None, lambda api, call, _: api.health(call), "Health check"),
    Operation("POST", "embed", schemas.EmbedRequest, TeiApi.embed, "Embeddings"),
    Operation("POST", "embed_all", schemas.EmbedAllRequest, TeiApi.embed_all, "Token embeddings"),
    Operation(
        "POST", "embed_sparse", schemas.EmbedSparseRequest, TeiApi.embed_sparse, "Sparse embeddings"
    ),
    Operation("POST", "predict", schemas.PredictRequest, TeiApi.predict, "Classification"),
    Operation("POST", "rerank", schemas.RerankRequest, TeiApi.rerank, "Reranking"),
    Operation("POST", "similarity", schemas.SimilarityRequest, TeiApi.similarity, "Similarity"),
    Operation("POST", "tokenize", schemas.TokenizeRequest, TeiApi.tokenize, "Tokenization"),
    Operation("POST", "decode", schemas.DecodeRequest, TeiApi.decode, "Token ids to text"),
)


class HttpServer:
    def __init__(
        self,
        router: Router,
        pool: ChannelPool,
        *,
        request_timeout: float = 30.0,
        max_client_batch_size: int = 2048,
        payload_limit_bytes: int = 2_000_000,
        keyring: Keyring | None = None,
        traffic: Traffic | None = None,
        hops: HopTracer | None = None,
    ) -> None:
        self.keyring = keyring or Keyring()
        self.router = router
        self.tei = TeiApi(router, pool, request_timeout, max_client_batch_size)
        self.openai = OpenAIApi(self.tei)
        self.metrics = HttpMetrics(traffic)
        self.hops = hops  # None: tracing is off
        self.payload_limit_bytes = payload_limit_bytes
        self.app = self._application()
        self._runner: web.AppRunner | None = None

    async def start(
        self, host: str, port: int, grace: float = 10.0, reuse_port: bool = False
    ) -> int:
        """Listen on host:port (0: any free port); return the bound port. `reuse_port`:
        share it with the other processes of `runmultiplexer --processes N`."""
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=grace
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        return int(runner.addresses[0][1])

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new requests, let those in flight finish within `grace` seconds."""
        if self._runner is not None:
            if grace is not None:
                self._runner._shutdown_timeout = grace  # fixed at start by aiohttp's API
            await self._runner.cleanup()
            self._runner = None

    # Routes ---------------------------------------------------------------------------

    def _application(self) -> web.Application:
        app = web.Application(client_max_size=self.payload_limit_bytes, middlewares=[self._guard])
        add = app.router.add_route
        for prefix, _ in TARGETS:
            for operation in TEI_OPERATIONS:
                add(operation.method, f"{prefix}/{operation.path}", self._tei_route(operation))
            for path in ("v1/embeddings", "embeddings"):
                add("POST", f"{prefix}/{path}", self._target_embeddings)
            add("POST", f"{prefix}/invocations", self._invocations)
            for root in (prefix, f"{prefix}/"):
                add("POST", root, self._invocations)
                add("GET", root, self._tei_route(TEI_OPERATIONS[1]))  # TEI: GET / is health
        add("POST", "/v1/embeddings", self._embeddings)
        add("GET", "/v1/models", self._models)
        add("GET", "/v1/models/{model:.+}", self._model)
        add("POST", "/v1/rerank", self._rerank)
        add("GET", "/health", self._health)
        add("GET", "/openapi.json", self._openapi)
        add("GET", "/docs", self._docs)
        app.router.add_static(openapi.ASSETS_URL, openapi.swagger_ui_dir())
        return app

    def _tei_route(self, operation: Operation) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            call = await self._start(request, _target(request))
            body = parse(operation.body, await request.read()) if operation.body else None
            return _json(await operation.run(self.tei, call, body))

        return handle

    async def _invocations(self, request: web.Request) -> web.Response:
        call = await self._start(request, _target(request))
        return _json(await self.tei.invocations(call, await request.read()))

    async def _target_embeddings(self, request: web.Request) -> web.Response:
        body = parse(schemas.OpenAIEmbeddingRequest, await request.read())
        call = await self._start(request, _target(request))
        return _json(await self.openai.embeddings(call, body, call.route.model_id))

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = parse(schemas.OpenAIEmbeddingRequest, await request.read())
        await self._ready(request, resolve(self.router.table, body.model or ""))
        call = self._started(
            request, self.openai.start(body.model, request[GRANT], _metadata(request))
        )
        return _json(await self.openai.embeddings(call, body, body.model or ""))

    async def _rerank(self, request: web.Request) -> web.Response:
        body = parse(schemas.OpenAIRerankRequest, await request.read())
        await self._ready(request, resolve(self.router.table, body.model or ""))
        call = self._started(
            request, self.openai.start(body.model, request[GRANT], _metadata(request))
        )
        return _json(await self.openai.rerank(call, body))

    async def _models(self, request: web.Request) -> web.Response:
        return _json(self.openai.models(request[GRANT]))

    async def _model(self, request: web.Request) -> web.Response:
        return _json(self.openai.model(request.match_info["model"], request[GRANT]))

    async def _health(self, request: web.Request) -> web.Response:
        return _json(Answer({"status": "ok"}))

    async def _openapi(self, request: web.Request) -> web.Response:
        return _json(Answer(openapi.document(TEI_OPERATIONS)))

    async def _docs(self, request: web.Request) -> web.Response:
        return web.Response(text=openapi.DOCS_PAGE, content_type="text/html")

    # Shared ---------------------------------------------------------------------------

    async def _start(self, request: web.Request, target: Target) -> Call:
        await self._ready(request, target)
        return self._started(request, self.tei.start(target, request[GRANT], _metadata(request)))

    async def _ready(self, request: web.Request, target: Target) -> None:
        """An on-demand model with no instance running: have one started, wait for it."""
        if self.router.needs_start(target, request[GRANT]):
            await self.router.start(target, None)

    def _started(self, request: web.Request, call: Call) -> Call:
        request[CALL] = call
        return call

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error in its route's shape, never a 500 for bad input; metrics per route;
        the request id (X-Request-ID) in the logs, the answer and the trace."""
        started = time.perf_counter()
        status = CLIENT_CLOSED
        request_id = accepted_request_id(request.headers.get(REQUEST_ID_HEADER)) or new_request_id()
        request[REQUEST] = request_id
        REQUEST_ID.set(request_id)  # this request's task only
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        if self.hops is not None:
            request[HOP] = self.hops.http(request.method, route, request.headers, request_id)
        try:
            try:
                if not _is_open(request.path):
                    request[GRANT] = self.keyring.check(_presented(request))
                response = await handler(request)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = from_exception(exc)
                if error is None:
                    log.exception("HTTP %s %s failed", request.method, request.path)
                    error = HttpError(
                        "Backend", f"multiplexer error: {type(exc).__name__}: {exc}", status=500
                    )
                response = render(error, shape_of(request.path))
            status = response.status
            response.headers["X-Request-ID"] = request_id
            return response
        finally:
            call = request.get(CALL)
            instance, tokens = (UNROUTED, 0) if call is None else (call.route.name, call.tokens)
            self.metrics.observe(instance, route, status, time.perf_counter() - started, tokens)
            hop = request.get(HOP)
            if hop is not None:
                hop.end_http(instance, status)


def _target(request: web.Request) -> Target:
    info = request.match_info
    if "name" in info:
        return Target(instance_name=info["name"])
    return Target(model_id=info["model_id"].rstrip("/"))


def _presented(request: web.Request) -> str | None:
    """The request's key: `Authorization: Bearer <key>`, else `X-API-Key`."""
    headers = request.headers
    authorization = headers.get("Authorization")
    if authorization is not None:
        key = bearer(authorization)
        if key is not None:
            return key
    return headers.get("X-API-Key", "").strip() or None


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(openapi.ASSETS_URL)


def _metadata(request: web.Request) -> tuple[Header, ...]:
    forwarded = tuple(
        (key, request.headers[key]) for key in _FORWARDED_HEADERS if key in request.headers
    ) + ((REQUEST_ID_HEADER, request[REQUEST]),)
    hop = request.get(HOP)
    return forwarded if hop is None else hop.forwarded(forwarded)


def _json(answer: Answer) -> web.Response:
    if answer.body is None:
        return web.Response(headers=answer.headers)
    return web.Response(
        body=orjson.dumps(answer.body, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type=_JSON,
        headers=answer.headers,
    )
