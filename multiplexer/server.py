"""The multiplexer's servers: gRPC (TeiMultiplexer, grpc.health.v1, server reflection) and
HTTP (TEI's HTTP API and OpenAI-compatible routes, multiplexer/http/), on one event loop.

An asyncio server (one event loop forwards every call and stream; a thread per stream
would not scale to `grpc_max_parallel_streams`), fed by the routing refresher thread.
The loop is uvloop's where it is installed: each forwarded call wakes the loop several
times, and uvloop's wake-ups are cheaper (see benchmarks/grpc_hop_floor.py).
"""

from __future__ import annotations

import asyncio
import socket
import threading

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from localtei.handlers import add_health_and_reflection
from localtei.settings import event_loop_factory
from multiplexer.channels import ChannelPool
from multiplexer.forwarding import SERVICE_NAME, Forwarder
from multiplexer.http.server import HttpServer
from multiplexer.keys import Keyring
from multiplexer.metrics import CallMetrics
from multiplexer.ondemand import ColdStarter
from multiplexer.options import ServerOptions
from multiplexer.refresher import HEARTBEAT_INTERVAL_SECS, RoutingRefresher
from multiplexer.rollup import Rollup
from multiplexer.routing import Router, RoutingTable
from multiplexer.tls import SubjectCheck, server_credentials
from multiplexer.tracing import HopTracer
from multiplexer.traffic import Snapshot, Traffic
from telemetry import tracing


def ask_for_instance(model_id: str) -> str:
    """The control plane's side of a cold start (run on a thread: it uses the ORM)."""
    from django.db import close_old_connections

    from registry.ondemand import ensure_instance

    close_old_connections()
    return ensure_instance(model_id)


class HttpBindError(RuntimeError):
    """The HTTP data plane's port cannot be bound."""


class MultiplexerServer:
    """Start it on an event loop; `port` is the bound port once `start` returns."""

    def __init__(self, options: ServerOptions, router: Router | None = None) -> None:
        self.options = options
        self.router = router or Router(queue_size=options.queue_size, processes=options.processes)
        self.pool = ChannelPool(options.message_size_options())
        self.keyring = Keyring(options.auth_required, options.open_listener)
        self.traffic = Traffic()
        rollup = None
        if options.rollup_interval_secs > 0:
            source = options.node or socket.gethostname()
            rollup = Rollup(self._collect_traffic, source, options.rollup_interval_secs)
        self.refresher = RoutingRefresher(
            self.router,
            options.refresh_interval_secs,
            heartbeat_interval=HEARTBEAT_INTERVAL_SECS if options.heartbeat else None,
            on_change=self._table_changed,
            keyring=self.keyring,
            rollup=rollup,
        )
        if options.on_demand_wait_secs > 0:
            self.router.cold = ColdStarter(
                self.router, ask_for_instance, self.refresher.refresh_once,
                options.on_demand_wait_secs,
            )  # fmt: skip
        recorder = tracing.recorder()
        self.hops = None if recorder is None else HopTracer(recorder)
        self.health = HealthServicer()
        self.port = 0
        self.http_port: int | None = None
        self.http: HttpServer | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        self._loop = asyncio.get_running_loop()
        # The refresher reads on its own thread (Django refuses ORM calls on a thread that
        # runs an event loop); wait for its first read off the loop.
        await asyncio.to_thread(self.refresher.start)
        options = self.options
        check_subjects = options.mtls.enabled and bool(options.mtls.allowed_subjects)
        interceptors = [SubjectCheck(options.mtls.allowed_subjects)] if check_subjects else None
        server = grpc.aio.server(
            options=[
                *options.message_size_options(),
                ("grpc.max_concurrent_streams", options.max_parallel_streams),
                # grpcio turns SO_REUSEPORT on unless told: a second server on a taken port
                # would then start silently. Only --processes N shares its port, on purpose.
                ("grpc.so_reuseport", int(options.reuse_port)),
            ],
            interceptors=interceptors,
        )
        forwarder = Forwarder(
            self.router,
            self.pool,
            CallMetrics(self.traffic),
            request_timeout=options.request_timeout_secs,
            max_message_bytes=options.max_message_bytes,
            keyring=self.keyring,
            hops=self.hops,
        )
        server.add_generic_rpc_handlers((forwarder.generic_handler(),))
        # Health and reflection answer a request that does not parse with INVALID_ARGUMENT.
        add_health_and_reflection(server, self.health, (SERVICE_NAME,))
        address = f"{options.host}:{options.port}"
        if options.mtls.enabled:
            self.port = server.add_secure_port(address, server_credentials(options.mtls))
        else:
            self.port = server.add_insecure_port(address)
        await server.start()
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(SERVICE_NAME, serving)
        self._server = server
        if options.http_port is not None:
            self.http = HttpServer(
                self.router,
                self.pool,
                request_timeout=options.request_timeout_secs,
                max_client_batch_size=options.max_client_batch_size,
                payload_limit_bytes=options.http_payload_limit_bytes,
                keyring=self.keyring,
                traffic=self.traffic,
                hops=self.hops,
            )
            try:
                self.http_port = await self.http.start(
                    options.host, options.http_port, reuse_port=options.reuse_port
                )
            except OSError as exc:
                await server.stop(None)
                raise HttpBindError(
                    f"cannot listen on {options.host}:{options.http_port} (HTTP, "
                    f"TEI_MANAGER_HTTP_PORT): {exc}"
                ) from exc
        return self.port

    async def stop(self, grace: float | None = 10.0) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then close."""
        await self.health.enter_graceful_shutdown()
        stops = [self._server.stop(grace)] if self._server is not None else []
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        await asyncio.to_thread(self.refresher.stop)
        await self.pool.close()

    def _collect_traffic(self) -> Snapshot:
        """The traffic windows, taken on the event loop that fills them (refresher thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return self.traffic.take(self.router)

        async def take() -> Snapshot:
            return self.traffic.take(self.router)

        return asyncio.run_coroutine_threadsafe(take(), loop).result(timeout=5)

    def _table_changed(self, table: RoutingTable) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.pool.retain, table.addresses)
            self._loop.call_soon_threadsafe(self.router.retain, table)


class BackgroundMultiplexer:
    """A MultiplexerServer on its own thread and event loop (tests, benchmarks)."""

    def __init__(self, options: ServerOptions, loop: str = "auto") -> None:
        self.options = options
        self.server: MultiplexerServer | None = None
        self._loop = event_loop_factory(loop)()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> int:
        self._thread.start()
        self.server = MultiplexerServer(self.options)
        future = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        return future.result(timeout=30)

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> BackgroundMultiplexer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
