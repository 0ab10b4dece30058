"""`python manage.py runmultiplexer`: the data plane (gRPC and HTTP), until SIGTERM or SIGINT.

With `--processes N` (N > 1) it forks N server processes that share the ports and keeps
them running (multiplexer/processes.py). It imports the server only in the process that
serves: the parent of N processes must fork before grpcio or pyarrow start anything.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from localtei.settings import LOOP_KINDS, event_loop_factory, loop_kind
from multiplexer.options import ROLLUP_SECS, ServerOptions
from multiplexer.processes import Link, StartError, Supervisor
from telemetry import logs, tracing
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
        parser.add_argument(
            "--processes",
            type=int,
            default=settings.TEI.multiplexer_processes,
            help="server processes sharing the ports, one per core to use "
            "(multiplexer_processes, default 1)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        # Tracing starts in each serving process (its exporter is a thread: none may run
        # in the parent of N processes when it forks them).
        logs.set_service("multiplexer")
        try:
            self.loop_factory = event_loop_factory(options["loop"])
        except ImportError:
            raise CommandError(
                "--loop uvloop: uvloop is not installed (pip install uvloop)"
            ) from None
        processes = options["processes"]
        if processes < 1:
            raise CommandError(f"--processes must be at least 1, got {processes}")
        self.grace = options["grace"]
        if self.grace is None:
            self.grace = float(settings.TEI.graceful_shutdown_timeout_secs)
        server_options = ServerOptions.from_config(
            settings.TEI,
            host=options["host"],
            port=options["port"],
            http_port=options["http_port"],
            refresh_interval_secs=options["refresh_interval"],
            processes=processes,
            rollup_interval_secs=options["rollup_interval"],
            node=settings.NODE_NAME,
        )
        if processes > 1 and settings.TEI.grpc_enabled:
            self.supervise(server_options, options["metrics_port"])
        else:
            with asyncio.Runner(loop_factory=self.loop_factory) as runner:
                runner.run(self.run(server_options, options["metrics_port"]))
        self.say("Done.")

    async def run(self, server_options: ServerOptions, metrics_port: int) -> None:
        """One process: serve, with the metrics on their own port."""
        from multiplexer.metrics import serve_metrics

        if not settings.TEI.grpc_enabled:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            # Stay up, idle: honcho stops the whole stack when one process exits.
            self.say("The gRPC multiplexer is disabled (TEI_MANAGER_GRPC_ENABLED=false).")
            await stop.wait()
            return
        try:
            serve_metrics(metrics_port, server_options.host)
        except OSError as exc:
            raise CommandError(
                f"cannot serve metrics on port {metrics_port} "
                f"(TEI_MANAGER_MULTIPLEXER_METRICS_PORT): {exc}"
            ) from None

        def ready(port: int, http_port: int | None, loop_kind: str) -> None:
            self.say(self.running(server_options, port, http_port, loop_kind, metrics_port))

        try:
            await self.serve(server_options, ready)
        except StartError as exc:
            raise CommandError(str(exc)) from None

    def supervise(self, server_options: ServerOptions, metrics_port: int) -> None:
        """N processes: the parent forks them, keeps them and serves their metrics."""
        directory = settings.TEI.prometheus_multiproc_dir
        if metrics_port and not os.path.isdir(directory):
            raise CommandError(
                f"--processes {server_options.processes} needs PROMETHEUS_MULTIPROC_DIR: a "
                "directory where the processes write their metrics, served as one on the "
                f"metrics port ({metrics_port}); or turn those off with --metrics-port 0"
                + (f" ({directory} is not a directory)" if directory else "")
            )
        supervisor = Supervisor(
            self.serve_process,
            server_options.processes,
            server_options,
            metrics_port=metrics_port,
            metrics_dir=directory,
            out=self.stdout.write,
        )
        try:
            pids = supervisor.start()
        except StartError as exc:
            raise CommandError(str(exc)) from None
        claimed = supervisor.options
        if not supervisor.stopping:  # a signal may have come while they started
            self.say(
                self.running(
                    claimed,
                    claimed.port,
                    claimed.http_port,
                    supervisor.loop_kind,
                    metrics_port,
                    pids,
                )
            )
        supervisor.run()
        self.say(f"Stopping: finishing in-flight calls (up to {self.grace:g} s)…")
        supervisor.stop(self.grace)
        if supervisor.failure:
            raise CommandError(supervisor.failure)

    def serve_process(self, server_options: ServerOptions, link: Link) -> None:
        """One of N forked processes: serve until SIGTERM or SIGINT, or the parent is gone."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(self.serve(server_options, lambda _, __, kind: link.ready(kind), link))

    async def serve(
        self,
        server_options: ServerOptions,
        ready: Callable[[int, int | None, str], None],
        link: Link | None = None,
    ) -> None:
        setup_process("multiplexer")
        try:
            await self._serve(server_options, ready, link)
        finally:
            tracing.shutdown()

    async def _serve(
        self,
        server_options: ServerOptions,
        ready: Callable[[int, int | None, str], None],
        link: Link | None,
    ) -> None:
        from multiplexer.server import HttpBindError, MultiplexerServer

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        server = MultiplexerServer(server_options)
        try:
            port = await server.start()
        except (HttpBindError, ValueError) as exc:
            # ValueError: an [auth.mtls] file went away after the system check.
            raise StartError(str(exc)) from None
        except RuntimeError as exc:
            raise StartError(
                f"cannot listen on {server_options.host}:{server_options.port}: {exc}"
            ) from None
        # What start-up loaded lives as long as the process: out of the collector's full
        # passes, which every call's garbage (and every span's, with tracing on) triggers.
        gc.freeze()
        ready(port, server.http_port, loop_kind(loop))
        orphaned = asyncio.create_task(link.until_orphaned(stop)) if link else None
        await stop.wait()
        if link is None:
            self.say(f"Stopping: finishing in-flight calls (up to {self.grace:g} s)…")
        await server.stop(self.grace)
        if orphaned is not None:
            orphaned.cancel()

    def running(
        self,
        server_options: ServerOptions,
        port: int,
        http_port: int | None,
        loop_kind: str,
        metrics_port: int,
        pids: list[int] | None = None,
    ) -> str:
        scheme = "mTLS" if server_options.mtls.enabled else "plaintext"
        processes = f", {len(pids)} processes (pids {', '.join(map(str, pids))})" if pids else ""
        traced = "on" if settings.TEI.otlp_endpoint else "off"
        return (
            f"The multiplexer is now running on {server_options.host}:{port} ({scheme}, "
            f"{loop_kind}), HTTP on port {http_port or 'none'}, "
            f"metrics on port {metrics_port or 'none'}, tracing {traced}{processes}."
        )

    def say(self, line: str) -> None:
        """A line for the operator: on stdout, or a JSON log line with the others."""
        if settings.TEI.log_format == "json":
            log.info(line)
        else:
            self.stdout.write(line)
