"""`python manage.py runmultiplexer`: the data plane (gRPC and HTTP), until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from multiplexer.metrics import serve_metrics
from multiplexer.rollup import ROLLUP_SECS
from multiplexer.server import (
    LOOP_KINDS,
    HttpBindError,
    MultiplexerServer,
    ServerOptions,
    event_loop_factory,
)
from telemetry import tracing
from telemetry.setup import setup_process

log = logging.getLogger("multiplexer")


class Command(BaseCommand):
    help = (
        "Run the multiplexer: gRPC (TeiMultiplexer, health, reflection) on TEI_MANAGER_GRPC_PORT "
        "and the HTTP data plane on TEI_MANAGER_HTTP_PORT."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--host",
            default=settings.TEI.grpc_host or settings.TEI.bind,
            help="address to listen on (TEI_MANAGER_GRPC_HOST, else TEI_MANAGER_BIND)",
        )
        parser.add_argument("--port", type=int, default=None, help="default: grpc_port")
        parser.add_argument(
            "--http-port",
            type=int,
            default=None,
            help="HTTP data plane port, 0 for any free one (default: http_port, none when "
            "http_enabled is false)",
        )
        parser.add_argument(
            "--grace",
            type=float,
            default=None,
            help="seconds in-flight calls get to finish (graceful_shutdown_timeout_secs)",
        )
        parser.add_argument("--refresh-interval", type=float, default=0.5)
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=settings.TEI.multiplexer_metrics_port,
            help="Prometheus port of the multiplexer (0: none)",
        )
        parser.add_argument(
            "--rollup-interval",
            type=float,
            default=ROLLUP_SECS,
            help="seconds between two traffic samples per instance (0: none)",
        )
        parser.add_argument(
            "--loop",
            choices=LOOP_KINDS,
            default="auto",
            help="event loop: uvloop where installed (auto), or asyncio's own",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            loop_factory = event_loop_factory(options["loop"])
        except ImportError:
            raise CommandError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        setup_process("multiplexer")
        try:
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                runner.run(self.run(options))
        finally:
            tracing.shutdown()
        self.say("Done.")

    def say(self, line: str) -> None:
        """A line for the operator: on stdout, or a JSON log line with the others."""
        if settings.TEI.log_format == "json":
            log.info(line)
        else:
            self.stdout.write(line)

    async def run(self, options: dict[str, Any]) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        if not settings.TEI.grpc_enabled:
            # Stay up, idle: honcho stops the whole stack when one process exits.
            self.say("The gRPC multiplexer is disabled (TEI_MANAGER_GRPC_ENABLED=false).")
            await stop.wait()
            return
        server_options = ServerOptions.from_config(
            settings.TEI,
            host=options["host"],
            port=options["port"],
            http_port=options["http_port"],
            refresh_interval_secs=options["refresh_interval"],
            rollup_interval_secs=options["rollup_interval"],
            node=settings.NODE_NAME,
        )
        try:
            serve_metrics(options["metrics_port"], options["host"])
        except OSError as exc:
            raise CommandError(
                f"cannot serve metrics on port {options['metrics_port']} "
                f"(TEI_MANAGER_MULTIPLEXER_METRICS_PORT): {exc}"
            ) from None
        server = MultiplexerServer(server_options)
        try:
            port = await server.start()
        except (HttpBindError, ValueError) as exc:
            # ValueError: an [auth.mtls] file went away after the system check.
            raise CommandError(str(exc)) from None
        except RuntimeError as exc:
            raise CommandError(
                f"cannot listen on {options['host']}:{server_options.port}: {exc}"
            ) from None
        # What start-up loaded lives as long as the process: out of the collector's full
        # passes, which every call's garbage (and every span's, with tracing on) triggers.
        gc.freeze()
        scheme = "mTLS" if server_options.mtls.enabled else "plaintext"
        loop_kind = type(loop).__module__.split(".")[0]  # "uvloop" or "asyncio"
        traced = "on" if tracing.tracer() is not None else "off"
        self.say(
            f"The multiplexer is now running on {options['host']}:{port} ({scheme}, {loop_kind}), "
            f"HTTP on port {server.http_port or 'none'}, "
            f"metrics on port {options['metrics_port'] or 'none'}, tracing {traced}.",
        )
        await stop.wait()
        grace = options["grace"]
        if grace is None:
            grace = float(settings.TEI.graceful_shutdown_timeout_secs)
        self.say(f"Stopping: finishing in-flight calls (up to {grace:g} s)…")
        await server.stop(grace)
