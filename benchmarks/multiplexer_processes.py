"""Multiplexer scaling: `runmultiplexer --processes 1` against `--processes 2`, same run.

Starts, each in its own process, on a scratch database:
- a no-op upstream: a grpc.aio server (uvloop) that answers every tei.v1 method at once
  with an empty message, so that what is measured is the multiplexer's own forwarding;
- one localtei (all-MiniLM-L6-v2), for Embed calls that do real work;
- two multiplexers, one with 1 process and one with 2 (each with its metrics port and
  PROMETHEUS_MULTIPROC_DIR, as in production).

The load comes from a separate client process (grpc.aio on uvloop, raw bytes, one TCP
connection per channel so that the kernel can spread them over the processes). Its own
CPU time is measured, and so is the CPU time of the multiplexer's processes and of the
upstream, per call; "direct" is the same client straight to the upstream (what the client
and upstream alone can do here). Rounds interleave the paths in shuffled order, so that
drift (other work on the machine) hits all alike.

Writes benchmarks/results/multiplexer_processes.md.
Usage: python benchmarks/multiplexer_processes.py
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

RESULTS = ROOT / "benchmarks" / "results" / "multiplexer_processes.md"
MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
ROUNDS = 7
NOOP = {"connections": 8, "depth": 16, "seconds": 3.0}
EMBED = {"connections": 4, "depth": 4, "seconds": 5.0}
WARM_UP_SECS = 1.0
EMBED_PATH = "/tei.v1.Embed/Embed"
ROUTED_PATH = "/tei_multiplexer.v1.TeiMultiplexer/Embed"
TEXT = "The quick brown fox jumps over the lazy dog"


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


START_LOAD = load_average()


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="multiplexer-processes-bench-"))
    os.environ["TEI_MANAGER_STATE_FILE"] = str(scratch / "state.sqlite3")
    os.environ["TEI_MANAGER_LOG_DIR"] = str(scratch / "logs")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import django

    django.setup()
    from django.core.management import call_command

    from instances.models import Instance
    from tests.localtei_fixtures import start_localtei

    call_command("migrate", verbosity=0)
    started: list[Server] = []
    try:
        noop = Server(scratch, "noop", [__file__, "noop", "{port}"])
        started.append(noop)
        noop.wait_until_listening()
        Instance.objects.create(
            name="noop", model_id="noop", port=noop.port, prometheus_port=noop.metrics,
            status="running", node="bench",
            max_concurrent_requests=1_000_000,  # admission never queues: forwarding alone
        )  # fmt: skip
        with start_localtei(MODEL_ID) as localtei:
            Instance.objects.create(
                name="minilm", model_id=MODEL_ID, port=localtei.port, status="running",
                prometheus_port=localtei.prometheus_port, node="bench",
            )  # fmt: skip
            multiplexers = {n: start_multiplexer(scratch, n) for n in (1, 2)}
            started += multiplexers.values()
            pids = {"localtei": localtei.proc.pid, "noop": noop.process.pid}
            rows = measure(noop.port, localtei.port, multiplexers, pids)
    finally:
        for server in started:
            server.stop()
    report = render(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


# Measuring ---------------------------------------------------------------------------------


def measure(
    noop_port: int, localtei_port: int, multiplexers: dict[int, Server], pids: dict[str, int]
) -> dict[str, dict[str, list[dict[str, float]]]]:
    """{"noop" | "embed": {path: [one window's figures per round]}}."""
    from tei.v1 import tei_pb2
    from tei_multiplexer.v1 import multiplexer_pb2 as mux

    def routed(name: str) -> str:
        wrapped = mux.EmbedRequest(
            target=mux.Target(instance_name=name), request=tei_pb2.EmbedRequest(inputs=TEXT)
        )
        return wrapped.SerializeToString().hex()

    inner = tei_pb2.EmbedRequest(inputs=TEXT).SerializeToString().hex()
    plans: dict[str, dict[str, tuple[str, str, str, list[int]]]] = {
        "noop": {
            "direct": (f"127.0.0.1:{noop_port}", EMBED_PATH, inner, [pids["noop"]]),
            **{
                f"{n} process{'es' if n > 1 else ''}": (
                    f"127.0.0.1:{m.port}", ROUTED_PATH, routed("noop"), [pids["noop"]]
                )
                for n, m in multiplexers.items()
            },
        },
        "embed": {
            "direct": (f"127.0.0.1:{localtei_port}", EMBED_PATH, inner, [pids["localtei"]]),
            **{
                f"{n} process{'es' if n > 1 else ''}": (
                    f"127.0.0.1:{m.port}", ROUTED_PATH, routed("minilm"), [pids["localtei"]]
                )
                for n, m in multiplexers.items()
            },
        },
    }  # fmt: skip
    mux_pids = {
        f"{n} process{'es' if n > 1 else ''}": m.process.pid for n, m in multiplexers.items()
    }
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        kind: {path: [] for path in plan} for kind, plan in plans.items()
    }
    for round_ in range(ROUNDS):
        for kind, plan in plans.items():
            order = list(plan)
            random.shuffle(order)
            for path in order:
                address, method, payload, upstream = plan[path]
                load = NOOP if kind == "noop" else EMBED
                family = process_family(mux_pids[path]) if path in mux_pids else []
                results[kind][path].append(window(address, method, payload, load, family, upstream))
                print(f"round {round_ + 1}/{ROUNDS} {kind} {path}: {results[kind][path][-1]}")
    return results


def window(
    address: str,
    method: str,
    payload: str,
    load: dict[str, float],
    multiplexer: list[int],
    upstream: list[int],
) -> dict[str, float]:
    """One measured window: the client process's calls/s and everyone's CPU per call."""
    command = [sys.executable, __file__, "client", address, method, payload]
    command += [str(load["connections"]), str(load["depth"]), str(load["seconds"])]
    client = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
    assert client.stdout is not None
    assert client.stdout.readline().strip() == "counting"  # warmed up
    mux_before, up_before = cpu_seconds(multiplexer), cpu_seconds(upstream)
    machine_before = machine_busy_seconds()
    report = json.loads(client.stdout.readline())
    mux_after, up_after = cpu_seconds(multiplexer), cpu_seconds(upstream)
    machine = machine_busy_seconds() - machine_before
    client.communicate(timeout=60)
    ours = report["cpu"] + (mux_after - mux_before) + (up_after - up_before)
    calls = max(report["calls"], 1)
    return {
        "calls_per_sec": report["calls"] / report["seconds"],
        "errors": report["errors"],
        "client_us": 1e6 * report["cpu"] / calls,
        "multiplexer_us": 1e6 * (mux_after - mux_before) / calls,
        "multiplexer_cores": (mux_after - mux_before) / report["seconds"],
        "upstream_us": 1e6 * (up_after - up_before) / calls,
        "others_cores": max(machine - ours, 0.0) / report["seconds"],
    }


def process_family(pid: int) -> list[int]:
    """A multiplexer's processes: the parent and its children (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(child) for child in children.read_text().split()] if children.exists() else []
    return [pid, *found]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy so far, all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    return total


# The client and the no-op upstream (run as `python multiplexer_processes.py client|noop`)


def client(address: str, method: str, payload_hex: str, conns: str, depth: str, secs: str) -> None:
    import grpc
    import uvloop

    payload = bytes.fromhex(payload_hex)

    async def run() -> None:
        # A local subchannel pool: each channel its own TCP connection.
        channels = [
            grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(int(conns))
        ]
        calls = [channel.unary_unary(method) for channel in channels]
        counting = False
        done = errors = 0
        stop = time.perf_counter() + WARM_UP_SECS + float(secs)

        async def caller(call: Any) -> None:
            nonlocal done, errors
            while time.perf_counter() < stop:
                try:
                    await call(payload, timeout=30)
                except grpc.RpcError:
                    errors += counting
                    continue
                done += counting

        tasks = [asyncio.create_task(caller(c)) for c in calls for _ in range(int(depth))]
        await asyncio.sleep(WARM_UP_SECS)
        counting = True
        print("counting", flush=True)
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*tasks)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        report = {"calls": done, "errors": errors, "seconds": seconds, "cpu": cpu}
        print(json.dumps(report), flush=True)
        for channel in channels:
            await channel.close()

    uvloop.run(run())


def noop(port: str) -> None:
    """Answer every tei.v1 method at once: an empty message (every field at its default)."""
    import grpc
    import uvloop

    async def unary(request: bytes, context: Any) -> bytes:
        return b""

    async def stream_in(requests: Any, context: Any) -> bytes:
        async for _ in requests:
            pass
        return b""

    async def streams(requests: Any, context: Any) -> Any:
        async for _ in requests:
            yield b""

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method = details.method
            if method.endswith("/RerankStream"):
                return grpc.stream_unary_rpc_method_handler(stream_in)
            if method.endswith("Stream"):
                return grpc.stream_stream_rpc_method_handler(streams)
            return grpc.unary_unary_rpc_method_handler(unary)

    async def serve() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Handler(),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


# Servers -----------------------------------------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}", **extra}


class Server:
    """A server subprocess: free ports, its output in the scratch directory."""

    def __init__(self, scratch: Path, name: str, command: list[str], **env: str) -> None:
        from tests.localtei_fixtures import free_port

        self.port, self.metrics = free_port(), free_port()
        self.log = scratch / f"{name}.log"
        arguments = [part.format(port=self.port, metrics=self.metrics) for part in command]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *arguments],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=child_env(**env),
            )

    def wait_until_listening(self, timeout: float = 60) -> None:
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            deadline = time.monotonic() + timeout
            while True:
                if self.process.poll() is not None:
                    raise SystemExit(f"a server exited; see {self.log}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    return
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"a server did not listen; see {self.log}") from None

    def wait_for_line(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"a server did not start; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_multiplexer(scratch: Path, processes: int) -> Server:
    directory = scratch / f"prometheus-{processes}"
    directory.mkdir()
    server = Server(
        scratch, f"multiplexer-{processes}",
        ["manage.py", "runmultiplexer", "--host", "127.0.0.1", "--port", "{port}",
         "--metrics-port", "{metrics}", "--http-port", "0", "--processes", str(processes)],
        PROMETHEUS_MULTIPROC_DIR=str(directory),
    )  # fmt: skip
    server.wait_for_line("is now running")
    return server


# The report --------------------------------------------------------------------------------


def render(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    def med(windows: list[dict[str, float]], key: str) -> float:
        return statistics.median(w[key] for w in windows)

    def spread(windows: list[dict[str, float]]) -> str:
        rates = [w["calls_per_sec"] for w in windows]
        return f"{min(rates):.0f}–{max(rates):.0f}"

    lines = [
        "# Multiplexer scaling: --processes 1 against --processes 2",
        "",
        f"Same run, {time.strftime('%Y-%m-%d %H:%M')}, {platform.machine()} × "
        f"{len(os.sched_getaffinity(0))} CPUs (shared with other work), Python "
        f"{platform.python_version()}. {ROUNDS} rounds, each path once per round in shuffled "
        "order. Load: one client process (grpc.aio on uvloop, bytes in and out); "
        f"no-op upstream: {NOOP['connections']} connections × {NOOP['depth']} calls in flight, "
        f"{NOOP['seconds']:g} s windows; Embed ({MODEL_ID}, one text per call, a localtei on "
        f"the CPU): {EMBED['connections']} × {EMBED['depth']}, {EMBED['seconds']:g} s windows. "
        "CPU per call: utime + stime over the window from /proc, divided by the calls; "
        "multiplexer = its parent and all of its processes. Other work: the machine's busy "
        "CPU (/proc/stat) less the client's, multiplexer's and upstream's, in cores: what "
        "the rest of the machine took meanwhile.",
        f"Load average when started: {START_LOAD}; when done: {load_average()}.",
        "",
    ]
    titles = {
        "noop": "Forwarded calls against a no-op upstream",
        "embed": "Embed against a real localtei",
    }
    for kind, paths in results.items():
        one = med(paths["1 process"], "calls_per_sec")
        two = med(paths["2 processes"], "calls_per_sec")
        lines += [
            f"## {titles[kind]}",
            "",
            "| path | calls/s (median) | rounds | errors | client CPU/call | multiplexer "
            "CPU/call | multiplexer cores busy | upstream CPU/call | other work, cores |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        for path, windows in paths.items():
            mux_us = "–" if path == "direct" else f"{med(windows, 'multiplexer_us'):.0f} µs"
            cores = "–" if path == "direct" else f"{med(windows, 'multiplexer_cores'):.2f}"
            lines.append(
                f"| {path} | {med(windows, 'calls_per_sec'):.0f} | {spread(windows)} | "
                f"{sum(w['errors'] for w in windows):.0f} | {med(windows, 'client_us'):.0f} µs | "
                f"{mux_us} | {cores} | {med(windows, 'upstream_us'):.0f} µs | "
                f"{med(windows, 'others_cores'):.2f} |"
            )
        ratios = [
            b["calls_per_sec"] / a["calls_per_sec"]
            for a, b in zip(paths["1 process"], paths["2 processes"], strict=True)
        ]
        per_call = med(paths["1 process"], "multiplexer_us")
        others = statistics.median(w["others_cores"] for ws in paths.values() for w in ws)
        lines += [
            "",
            f"Scaling, 2 processes against 1: {two / one:.2f}× (per round: "
            f"{min(ratios):.2f}–{max(ratios):.2f}).",
            f"At {per_call:.0f} µs of multiplexer CPU per call, one process forwards at most "
            f"{1e6 / per_call:.0f} calls/s on a core of its own; N processes, N times that on N "
            f"free cores. Other work took a median of {others:.2f} of the "
            f"{len(os.sched_getaffinity(0))} cores during these windows.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    commands: dict[str, Callable[..., None]] = {"client": client, "noop": noop}
    if sys.argv[1:2] and sys.argv[1] in commands:
        commands[sys.argv[1]](*sys.argv[2:])
    else:
        raise SystemExit(main())
