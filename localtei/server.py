"""Start-up and shutdown: bind, say NOT_SERVING, load and warm the model, say SERVING.

TEI loads the model before it listens; localtei listens first so that the manager's
health check sees NOT_SERVING (not a refused connection) while the model loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from localtei.errors import StartupError
from localtei.lookup import ModelLocation, find_model
from localtei.settings import Settings, configured_event_loop, core_count, loop_kind
from localtei.spec import ModelSpec, describe_model

if TYPE_CHECKING:  # kept off the fast "model not found" path
    from localtei.model import Model
    from localtei.services import TeiService

log = logging.getLogger("localtei")

T = TypeVar("T")

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_SHUTDOWN_GRACE_SECONDS = 10.0


def run(settings: Settings) -> int:
    """The process's life: 0 after a clean shutdown, 1 when the start fails."""
    try:
        with asyncio.Runner(loop_factory=configured_event_loop()) as runner:
            return runner.run(_serve(settings))
    except StartupError as err:
        log.error("%s", err)
        return 1


async def _serve(settings: Settings) -> int:
    settings = dataclasses.replace(settings, hostname=listen_address(settings.hostname))
    # Fail fast (before binding, before torch) when the model is nowhere to be found.
    location = find_model(settings.model_id, settings.revision, settings.huggingface_hub_cache)
    log.info("Model files for '%s' found in %s", settings.model_id, location.describe())
    # One it cannot serve fails here.
    spec = describe_model(location.path, settings.pooling, settings.model_id)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    from localtei.services import SERVICE_NAMES, TeiService

    service = TeiService(settings)
    health = HealthServicer()
    server = _grpc_server(settings, service, health, SERVICE_NAMES)
    for name in ("", *SERVICE_NAMES):
        await health.set(name, _NOT_SERVING)
    await server.start()
    log.info(
        "Starting gRPC server on %s:%d (%s event loop)",
        settings.hostname,
        settings.port,
        loop_kind(loop),
    )
    _serve_metrics(settings)

    loading = _in_daemon_thread(_load_model, settings, location, spec)
    stopping = asyncio.ensure_future(stop.wait())
    waiters: list[asyncio.Future[Any]] = [loading, stopping]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        log.info("Signal received while loading the model: shutting down")
        from localtei.onnx_export import cancel_exports

        cancel_exports()
        await server.stop(0)
        return 0
    try:
        model = loading.result()
    except StartupError:
        await server.stop(0)
        raise

    from localtei.batching import Batcher
    from localtei.services import served_services

    batcher = Batcher(
        model.run,
        service.deliver,
        min(settings.max_batch_tokens, model.engine.batch_tokens or settings.max_batch_tokens),
        settings.max_batch_requests,
        tokenize=model.tokenizer.encode_many,
        tokenization_workers=settings.tokenization_workers or core_count(),
        runners=model.engine.runners,
    )
    service.attach(model, batcher)
    await health.set("", _SERVING)
    for name in served_services(model.spec.kind):
        await health.set(name, _SERVING)
    log.info("Ready")

    await stopping
    log.info("Signal received: shutting down")
    await health.enter_graceful_shutdown()
    await server.stop(_SHUTDOWN_GRACE_SECONDS)
    service.detach()
    batcher.stop()
    log.info("Done")
    return 0


def _grpc_server(
    settings: Settings, service: TeiService, health: HealthServicer, service_names: tuple[str, ...]
) -> grpc.aio.Server:
    from localtei.handlers import add_health_and_reflection
    from localtei.services import add_tei_services

    server = grpc.aio.server(
        options=[
            # Without this a second server could bind the same port and split the traffic.
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", max(settings.payload_limit, 4 * 1024 * 1024)),
            ("grpc.max_send_message_length", -1),
        ]
    )
    add_tei_services(service, server)
    add_health_and_reflection(server, health, service_names)
    address = f"{_grpc_host(settings.hostname)}:{settings.port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from exc
    return server


def _in_daemon_thread(function: Callable[..., T], *args: object) -> asyncio.Future[T]:
    """Run `function` in a daemon thread: a signal during a slow load need not wait for it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: we are exiting anyway
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=target, name="localtei-load", daemon=True).start()
    return future


def _serve_metrics(settings: Settings) -> None:
    from localtei.metrics import serve_metrics

    try:
        serve_metrics(settings.prometheus_port, settings.hostname)
    except OSError as exc:
        address = f"{settings.hostname}:{settings.prometheus_port}"
        raise StartupError(f"cannot serve Prometheus metrics on {address}: {exc}") from exc
    log.info("Serving Prometheus metrics on %s:%d", settings.hostname, settings.prometheus_port)


def _load_model(settings: Settings, location: ModelLocation, spec: ModelSpec) -> Model:
    try:
        return _load_and_warm_up(settings, location, spec)
    except StartupError as err:
        raise StartupError(location.hide_path(str(err), settings.model_id)) from err
    except Exception as exc:  # noqa: BLE001 - whatever it is, it is one line in the log
        reason = location.hide_path(str(exc), settings.model_id)
        raise StartupError(f"model '{settings.model_id}' failed to load: {reason}") from exc


def _load_and_warm_up(settings: Settings, location: ModelLocation, spec: ModelSpec) -> Model:
    started = time.perf_counter()
    log.info("Starting model load")
    from localtei.model import load_model

    model = load_model(
        settings.model_id,
        settings.pooling,
        settings.dtype,
        backend=settings.backend,
        default_prompt=settings.default_prompt,
        default_prompt_name=settings.default_prompt_name,
        # An input must fit in one batch.
        max_input_length=settings.max_batch_tokens,
        found=(location, spec),
    )
    model.warm_up()
    log.info(
        "Model loaded in %.1fs: %s, %s on %s, pooling %s, dtype %s, %d threads",
        time.perf_counter() - started,
        model.spec.kind.value,
        model.backend,
        model.device,
        model.spec.pooling,
        model.dtype,
        model.engine.threads,
    )
    log.info("Maximum number of tokens per request: %d", model.tokenizer.max_input_length)
    return model


def listen_address(hostname: str) -> str:
    """`--hostname` as TEI takes it: an IP address, or else every interface (a container's
    HOSTNAME variable holds its name, which TEI does not resolve)."""
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        log.warning("Invalid hostname %r, defaulting to 0.0.0.0", hostname)
        return "0.0.0.0"
    return hostname


def _grpc_host(hostname: str) -> str:
    # An IPv6 literal needs brackets in a gRPC address.
    return f"[{hostname}]" if ":" in hostname and not hostname.startswith("[") else hostname
