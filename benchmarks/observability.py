"""What observability costs the data plane: per-call cost with tracing off and on (same run),
and the traffic roll-up's cost with the multiplexer under 64 concurrent callers.

1. Per call, in process: the Forwarder's unary handler (wire scan, routing, admission,
   Prometheus, traffic window, token scan, tracing hooks) driven on uvloop against an
   instance stand-in that answers at once, so that nothing but the multiplexer's own work
   is timed. Rounds alternate between: tracing off (as shipped); tracing on (OpenTelemetry
   SDK, batch processor, OTLP/HTTP exporter to a local collector in another process); and
   "bare" (the traffic window and the token scan stubbed out), which prices those two.
   The tracing hooks themselves when off are timed alone as well. Costs are CPU time per
   call, which other processes' load on a shared machine inflates far less than wall time:
   the event loop's thread (what the call's path pays) and the whole process (the batch
   processor's thread, which encodes and sends the spans, included).
2. The roll-up: three `manage.py runmultiplexer` processes on one scratch database, with
   the roll-up every 10 s (as shipped), every 1 s (ten times the work) and off, each
   routing 16 instances to one fast stand-in instance (an asyncio gRPC server answering
   Embed at once, with Metadata). 64 concurrent callers, rounds interleaved; then each
   multiplexer's own histogram says how long its roll-ups took.

Writes benchmarks/results/observability.md. Usage: python benchmarks/observability.py
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto"), str(ROOT / "benchmarks")]
SCRATCH = Path(tempfile.mkdtemp(prefix="observability-bench-"))
os.environ["TEI_MANAGER_STATE_FILE"] = str(SCRATCH / "state.sqlite3")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")

import django  # noqa: E402

django.setup()

import grpc  # noqa: E402
import uvloop  # noqa: E402
from django.core.management import call_command  # noqa: E402
from grpc_hop_floor import free_port  # noqa: E402
from tei.v1 import tei_pb2  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2 as mux  # noqa: E402

import multiplexer.forwarding as forwarding  # noqa: E402
from multiplexer.forwarding import Forwarder, proxied_methods  # noqa: E402
from multiplexer.metrics import CallMetrics  # noqa: E402
from multiplexer.routing import Route, Router, RoutingTable  # noqa: E402
from multiplexer.tracing import HopTracer  # noqa: E402
from multiplexer.traffic import Traffic  # noqa: E402
from telemetry import tracing  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "observability.md"
CALLS_PER_ROUND, ROUNDS = 2000, 15
HOOK_REPEATS = 1_000_000
INSTANCES, CALLERS = 16, 64
LOAD_ROUNDS, CALLS_PER_CALLER = 8, 60
ROLLUP_CONFIGS = (("every 10 s (shipped)", 10.0), ("every 1 s", 1.0), ("off", 0.0))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
REPLY = tei_pb2.EmbedResponse(
    embeddings=[0.25] * 384,
    metadata=tei_pb2.Metadata(compute_chars=43, compute_tokens=12, total_time_ns=1000),
).SerializeToString()


def main() -> int:
    speed = [reference_loop()]
    per_call = measure_per_call()
    hooks = measure_hooks_off()
    speed.append(reference_loop())
    takes = {count: measure_take(count) for count in (INSTANCES, 100)}
    rollup = measure_rollup()
    report = render(per_call, hooks, rollup, statistics.mean(speed), takes)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


# 1. Per call ------------------------------------------------------------------------------


class Context:
    """What the handler asks of grpc.aio's ServicerContext."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self.metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


class Pool:
    """An instance that answers every call at once (no network)."""

    def unary_unary(self, address: str, path: str) -> Callable[..., Any]:
        return self._call

    async def _call(self, request: bytes, timeout: float, metadata: Any) -> bytes:
        return REPLY


def handler(hops: HopTracer | None) -> Callable[..., Any]:
    table = RoutingTable.build([Route("bench", "m", "127.0.0.1:1", "running")])
    forwarder = Forwarder(Router(table), Pool(), CallMetrics(Traffic()), hops=hops)  # type: ignore[arg-type]
    [embed] = [m for m in proxied_methods() if m.name == "Embed"]
    return forwarder._unary_unary(embed)


def measure_per_call() -> dict[str, dict[str, list[float]]]:
    collector = multiprocessing.Process(
        target=serve_collector, args=(port := free_port(),), daemon=True
    )
    collector.start()
    try:
        tracing.configure("tei-manager-bench", f"http://127.0.0.1:{port}")
        recorder = tracing.recorder()
        assert recorder is not None
        forwards = {"off": handler(None), "on": handler(HopTracer(recorder)), "bare": handler(None)}
        request = mux.EmbedRequest(
            target=mux.Target(instance_name="bench"), request=tei_pb2.EmbedRequest(inputs="hi")
        ).SerializeToString()
        context = Context((("traceparent", TRACEPARENT), ("x-request-id", "bench")))
        gc.freeze()  # as runmultiplexer does once it is up
        spent: dict[str, dict[str, list[float]]] = {
            name: {"loop": [], "cpu": [], "wall": []} for name in forwards
        }

        async def run(name: str, count: int) -> None:
            forward = forwards[name]
            tracing.flush()  # the last variant's spans are not this one's cost
            cpu, wall = time.process_time(), time.perf_counter()
            loop = time.thread_time()
            for _ in range(count):
                await forward(request, context)
            loop = time.thread_time() - loop
            tracing.flush()  # this variant's spans are encoded and sent within its time
            spent[name]["loop"].append(loop / count)
            spent[name]["cpu"].append((time.process_time() - cpu) / count)
            spent[name]["wall"].append((time.perf_counter() - wall) / count)

        async def rounds() -> None:
            for name in forwards:
                await run(name, CALLS_PER_ROUND)  # warm
            for values in spent.values():
                for measured in values.values():
                    measured.clear()
            for round_ in range(ROUNDS):
                order = list(forwards)[:: 1 if round_ % 2 else -1]
                for name in order:
                    if name == "bare":
                        with stubbed_traffic():
                            await run(name, CALLS_PER_ROUND)
                    else:
                        await run(name, CALLS_PER_ROUND)

        uvloop.run(rounds())
        tracing.shutdown()
    finally:
        collector.terminate()
        collector.join(10)
    return spent


class stubbed_traffic:
    """The traffic window and the token scan as no-ops, for the "bare" rounds."""

    def __enter__(self) -> None:
        self.record, self.scan = Traffic.record, forwarding.response_tokens
        Traffic.record = lambda *args, **kwargs: None  # type: ignore[method-assign]
        forwarding.response_tokens = lambda data: 0

    def __exit__(self, *exc: Any) -> None:
        Traffic.record = self.record  # type: ignore[method-assign]
        forwarding.response_tokens = self.scan


def reference_loop() -> float:
    """CPU seconds for a million Python additions: how fast this machine runs Python now
    (a shared machine under load runs it several times slower than an idle one)."""
    started, total = time.process_time(), 0
    for number in range(1_000_000):
        total += number
    return time.process_time() - started


def measure_take(instances: int) -> float:
    """Seconds the event loop spends handing the windows of `instances` busy instances to
    the roll-up (Traffic.take: the only part of the roll-up that runs on the loop)."""
    names = [f"i{index}" for index in range(instances)]
    router = Router(RoutingTable.build([Route(n, "m", "127.0.0.1:1", "running") for n in names]))
    traffic, spent = Traffic(), []
    for _ in range(200):
        for name in names:
            for _ in range(5):
                traffic.record(name, False, 0.004, 12)
        started = time.process_time()
        traffic.take(router)
        spent.append(time.process_time() - started)
    return statistics.median(spent)


def measure_hooks_off() -> float:
    """Seconds per call of the tracing hooks as the handler runs them with tracing off."""
    hops = None
    metadata = (("traceparent", TRACEPARENT),)

    def hooks() -> None:
        hop = None if hops is None else hops.grpc("Embed", metadata)
        if hop is not None:
            hop.end_grpc("bench", grpc.StatusCode.OK)

    def nothing() -> None:
        pass

    cpu = time.process_time
    with_hooks = min(timeit.repeat(hooks, number=HOOK_REPEATS, repeat=5, timer=cpu))
    without = min(timeit.repeat(nothing, number=HOOK_REPEATS, repeat=5, timer=cpu))
    return max(with_hooks - without, 0.0) / HOOK_REPEATS


def serve_collector(port: int) -> None:
    """An OTLP/HTTP collector that takes every export and drops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


# 2. The roll-up under load -----------------------------------------------------------------


def measure_rollup() -> list[dict[str, Any]]:
    call_command("migrate", verbosity=0)
    from instances.models import Instance

    stand_in = multiprocessing.Process(
        target=serve_stand_in, args=(port := free_port(),), daemon=True
    )
    stand_in.start()
    servers: list[Multiplexer] = []
    try:
        for index in range(INSTANCES):
            Instance.objects.create(
                name=f"bench-{index}", model_id="bench/model", port=port,
                prometheus_port=20000 + index, status="running", node=f"bench-{index}",
            )  # fmt: skip
        servers = [Multiplexer(label, interval) for label, interval in ROLLUP_CONFIGS]
        for server in servers:
            server.wait_until_serving()
        results: dict[str, dict[str, list[float]]] = {
            s.label: {"throughput": [], "p50": [], "p99": []} for s in servers
        }
        uvloop.run(load(servers, 1))  # warm
        for round_ in range(LOAD_ROUNDS):
            for server in servers[:: 1 if round_ % 2 else -1]:
                throughput, p50, p99 = uvloop.run(load([server], CALLS_PER_CALLER))
                results[server.label]["throughput"].append(throughput)
                results[server.label]["p50"].append(p50)
                results[server.label]["p99"].append(p99)
        rows = []
        for server in servers:
            metrics = server.scrape()
            rows.append({"label": server.label, "interval": server.interval,
                         **{k: statistics.median(v) for k, v in results[server.label].items()},
                         **metrics})  # fmt: skip
        return rows
    finally:
        for server in servers:
            server.stop()
        stand_in.terminate()
        stand_in.join(10)


async def load(servers: list[Multiplexer], calls_per_caller: int) -> tuple[float, float, float]:
    """CALLERS concurrent callers over the instances, through each of `servers`."""
    requests = [
        mux.EmbedRequest(target=mux.Target(instance_name=f"bench-{i}"),
                         request=tei_pb2.EmbedRequest(inputs="hi")).SerializeToString()
        for i in range(INSTANCES)
    ]  # fmt: skip
    latencies: list[float] = []
    started = time.perf_counter()
    for server in servers:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = channel.unary_unary("/tei_multiplexer.v1.TeiMultiplexer/Embed")

            async def caller(call: Any, index: int) -> None:
                for n in range(calls_per_caller):
                    began = time.perf_counter()
                    await call(requests[(index + n) % INSTANCES], timeout=30)
                    latencies.append(time.perf_counter() - began)

            await asyncio.gather(*(caller(call, i) for i in range(CALLERS)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return (
        len(latencies) / elapsed,
        latencies[len(latencies) // 2],
        latencies[int(len(latencies) * 0.99)],
    )


def serve_stand_in(port: int) -> None:
    async def serve() -> None:
        server = grpc.aio.server()

        async def embed(request: bytes, context: Any) -> bytes:
            return REPLY

        handlers = {"Embed": grpc.unary_unary_rpc_method_handler(embed)}
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tei.v1.Embed", handlers),)
        )
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


class Multiplexer:
    def __init__(self, label: str, interval: float) -> None:
        self.label, self.interval = label, interval
        self.port, self.metrics_port = free_port(), free_port()
        self.log = SCRATCH / f"multiplexer-{self.port}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "manage.py", "runmultiplexer", "--host", "127.0.0.1",
                 "--port", str(self.port), "--metrics-port", str(self.metrics_port),
                 "--http-port", "0", "--rollup-interval", str(interval)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}",
                     "TEI_MANAGER_NODE": f"bench-{self.port}"},
            )  # fmt: skip

    def wait_until_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while "is now running" not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the multiplexer did not start; see {self.log}")
            time.sleep(0.1)

    def scrape(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics") as reply:
            text = reply.read().decode()

        def value(name: str, labels: str = "") -> float:
            match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
            return float(match.group(1)) if match else 0.0

        count = value("tei_manager_multiplexer_rollup_duration_seconds_count")
        total = value("tei_manager_multiplexer_rollup_duration_seconds_sum")
        return {
            "rollups": count,
            "rollup_mean": total / count if count else 0.0,
            "rollup_p95": bucket_quantile(text, count, 0.95),
            "rows": value("tei_manager_multiplexer_rollup_rows_total"),
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def bucket_quantile(text: str, count: float, q: float) -> float:
    """The upper bound of the histogram bucket that holds the q-quantile."""
    if not count:
        return 0.0
    pattern = r'^tei_manager_multiplexer_rollup_duration_seconds_bucket\{le="([^"]+)"\} (\S+)$'
    for bound, cumulative in re.findall(pattern, text, re.MULTILINE):
        if float(cumulative) >= q * count:
            return float(bound)
    return float("inf")


# Report -------------------------------------------------------------------------------


def render(
    per_call: dict[str, dict[str, list[float]]],
    hooks: float,
    rollup: list[dict[str, Any]],
    speed: float,
    takes: dict[int, float],
) -> str:
    names = ("off", "on", "bare")
    loop = {name: per_call[name]["loop"] for name in names}
    med = {
        kind: {name: statistics.median(per_call[name][kind]) * 1e6 for name in names}
        for kind in ("loop", "cpu", "wall")
    }
    added_on = [(a - b) * 1e6 for a, b in zip(loop["on"], loop["off"], strict=True)]
    added_total = [
        (a - b) * 1e6 for a, b in zip(per_call["on"]["cpu"], per_call["off"]["cpu"], strict=True)
    ]
    added_traffic = [(a - b) * 1e6 for a, b in zip(loop["off"], loop["bare"], strict=True)]
    hooks_us = hooks * 1e6
    traced_added = statistics.median(added_on)
    traced_total = statistics.median(added_total)
    traffic_added = statistics.median(added_traffic)
    shipped = next(row for row in rollup if row["interval"] == 10.0)
    no_rollup = next(row for row in rollup if row["interval"] == 0.0)

    def verdict(met: bool) -> str:
        return "✅" if met else "❌"

    lines = [
        "# Observability overhead",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} × {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}. "
        f"Load average when done: {', '.join(f'{x:.2f}' for x in os.getloadavg())} (the "
        "machine is shared). A million Python additions took "
        f"{speed * 1000:.0f} ms of CPU during the per-call measurements, for scale.",
        "",
        "## Per call, tracing off and on (same run)",
        "",
        "The multiplexer's unary handler in process on uvloop, against an instance stand-in "
        f"that answers at once; {ROUNDS} rounds of {CALLS_PER_ROUND} calls per variant, "
        "variants alternating; medians of the rounds. Tracing on: OpenTelemetry SDK, batch "
        "span processor, OTLP/HTTP exporter to a local collector in another process (each "
        "round ends with its spans exported); the client sends a `traceparent` and an "
        "`x-request-id`. Per call: CPU time of the event loop's thread (the call's path), of "
        "the whole process (the exporter's thread too), and wall time.",
        "",
        "| handler | loop thread | process | wall |",
        "|---|---:|---:|---:|",
        *(
            f"| {label} | {med['loop'][name]:.1f} µs | {med['cpu'][name]:.1f} µs "
            f"| {med['wall'][name]:.1f} µs |"
            for name, label in (
                ("off", "tracing off (as shipped)"),
                ("on", "tracing on"),
                ("bare", "tracing off, traffic window and token scan stubbed out"),
            )
        ),
        "",
        "| added | per call | goal |",
        "|---|---:|---|",
        f"| **added by tracing when off** (the hooks, timed alone) | {hooks_us * 1000:.0f} ns "
        f"| ≤ 5 µs {verdict(hooks_us <= 5)} |",
        f"| added by the traffic window + token scan (tracing off) | {traffic_added:.2f} µs "
        f"(rounds {min(added_traffic):.2f}–{max(added_traffic):.2f}) "
        f"| ≤ 5 µs with the hooks {verdict(traffic_added + hooks_us <= 5)} |",
        f"| **added by tracing when on**, on the call's path | {traced_added:.1f} µs "
        f"(rounds {min(added_on):.1f}–{max(added_on):.1f}) "
        f"| ≤ 50 µs {verdict(traced_added <= 50)} |",
        f"| added by tracing when on, exporter's thread included | {traced_total:.1f} µs "
        f"(rounds {min(added_total):.1f}–{max(added_total):.1f}) "
        f"| ≤ 50 µs {verdict(traced_total <= 50)} |",
        "",
        "## The traffic roll-up under load",
        "",
        f"{CALLERS} concurrent callers (one client process, grpc.aio) through `manage.py "
        f"runmultiplexer` to {INSTANCES} instances (one stand-in that answers Embed at once), "
        f"{LOAD_ROUNDS} rounds of {CALLERS * CALLS_PER_CALLER} calls per multiplexer, "
        "interleaved; medians. Roll-up times are each multiplexer's own histogram "
        "(`tei_manager_multiplexer_rollup_duration_seconds`, its refresher thread: collecting "
        "the windows from the event loop and writing one row per instance to SQLite).",
        "",
        "| roll-up | calls/s | p50 | p99 | vs no roll-up | roll-ups | mean per roll-up "
        "| p95 bucket | rows |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {row['label']} | {row['throughput']:.0f} | {row['p50'] * 1000:.2f} ms "
            f"| {row['p99'] * 1000:.2f} ms | {row['throughput'] / no_rollup['throughput']:.3f} "
            f"| {row['rollups']:.0f} | {row['rollup_mean'] * 1000:.2f} ms "
            f"| ≤ {row['rollup_p95'] * 1000:g} ms | {row['rows']:.0f} |"
            for row in rollup
        ),
        "",
        f"As shipped (every 10 s) a roll-up took {shipped['rollup_mean'] * 1000:.1f} ms of wall "
        "time on the refresher thread, most of it waiting: for the busy event loop to hand "
        "the windows over, and for the GIL. The event loop's own part is `Traffic.take`: "
        + ", ".join(
            f"{takes[count] * 1e6:.1f} µs of CPU for {count} busy instances" for count in takes
        )
        + ", once per window. Calls per second with the roll-up are within this run's noise "
        "of calls per second without it (rounds vary by more than the columns differ).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
