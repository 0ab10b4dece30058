"""The floor under localtei's one-text latency: Python gRPC servers around the model's call.

    .venv/bin/python benchmarks/localtei_floor.py [--samples 300] [--calls 3000]

Each bare server runs nothing but an Embed call, in its own process, laid out the ways a
Python gRPC server can be:

- grpc.aio, the call inline on the event loop, on asyncio's loop and on uvloop's;
- grpc.aio, the call on a worker thread, on either loop (localtei's hand-over, without
  its batcher; localtei runs on uvloop);
- grpcio's thread-pool server, the call inline on the handler's thread;
- grpcio's thread-pool server, the call on a worker thread.

Measured:

1. one-text p50 with the model's call (`PlainOnnx` of localtei_throughput.py: tokenize,
   the ONNX file localtei runs at ONNX Runtime's defaults, mean-pool, normalize) against
   the same call in-process and against the localtei server at its defaults (uvloop) and
   on asyncio's own loop (LOCALTEI_LOOP=asyncio), in blocks of 10 calls per side;
2. the same again with the CPUs kept out of their halted idle state (PM QoS: 0 written
   to /dev/cpu_dma_latency and held, as tuned's latency-performance profile does), where
   that file is writable: it shows how much of gRPC's cost around a call that leaves the
   CPUs idle is waking them;
3. the server's CPU per call under `--clients` concurrent callers when the call is
   answered at once (no model), for each layout.

Writes benchmarks/results/localtei_floor.md and prints it.
`python benchmarks/localtei_floor.py serve LAYOUT PORT ONNX_FILE TOKENIZER_JSON` runs one
server with the model; `... serve LAYOUT PORT none SIZE` one that answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import localtei_throughput as bench  # noqa: E402
from localtei_throughput import (  # noqa: E402
    LATENCY_TEXT,
    EmbedCall,
    PlainOnnx,
    grpc,
    latency_p50,
    model_call,
    psutil,
    serve_bare,
    tei_pb2,
    tei_pb2_grpc,
    uvloop,
    waiting_call,
)

RESULTS = bench.ROOT / "benchmarks" / "results" / "localtei_floor.md"
LAYOUTS = {
    "aio": "grpc.aio, inline on the event loop",
    "aio-worker": "grpc.aio, on a worker thread",
    "uvloop": "grpc.aio on uvloop, inline on the event loop",
    "uvloop-worker": "grpc.aio on uvloop, on a worker thread (localtei's layout)",
    "threads": "thread-pool server, inline on the handler's thread",
    "threads-worker": "thread-pool server, on a worker thread",
}
PM_QOS = Path("/dev/cpu_dma_latency")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        layout, port, what, argument = sys.argv[2:6]
        embed = waiting_call(0.0, int(argument)) if what == "none" else model_call(what, argument)
        serve(layout, int(port), embed)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    from localtei.model import load_model

    model = load_model(bench.MINILM_ID, backend="onnx")
    plain = PlainOnnx.of(model)
    tokenizer = str(bench.minilm_path() / "tokenizer.json")
    size = str(model.output_size)
    p50: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        env = bench.localtei_env()
        env.pop("LOCALTEI_NUM_THREADS", None)  # at its defaults
        addresses = {}
        for name, loop in (("localtei", "auto"), ("localtei-asyncio", "asyncio")):
            started = bench.start_localtei(bench.MINILM_ID, env={**env, "LOCALTEI_LOOP": loop})
            addresses[name] = stack.enter_context(started).address
        for layout in LAYOUTS:
            addresses[layout], _ = stack.enter_context(server(layout, plain.path, tokenizer))
        calls = {"in-process": lambda: plain.embed([LATENCY_TEXT], 1)}
        for name, address in addresses.items():
            stub = tei_pb2_grpc.EmbedStub(stack.enter_context(grpc.insecure_channel(address)))
            calls[name] = lambda stub=stub: stub.Embed(tei_pb2.EmbedRequest(inputs=LATENCY_TEXT))
        p50["as the host is"] = latency_p50(calls, args.samples)
        with cpu_latency_held() as held:
            if held:
                p50["idle states held at polling"] = latency_p50(calls, args.samples)
    cpu = {layout: cpu_per_call(layout, size, args.calls, args.clients) for layout in LAYOUTS}
    report = render(args, p50, cpu, held)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


def serve(layout: str, port: int, embed: EmbedCall) -> None:
    """One Embed server laid out as `layout` (a key of LAYOUTS) around `embed`."""
    if layout.startswith("threads"):
        serve_thread_pool(port, embed, worker=layout.endswith("worker"))
    elif layout.startswith("uvloop"):
        uvloop.run(serve_bare(port, embed, worker=layout.endswith("worker")))
    else:
        asyncio.run(serve_bare(port, embed, worker=layout.endswith("worker")))


def serve_thread_pool(port: int, embed: EmbedCall, worker: bool) -> None:
    pool = ThreadPoolExecutor(1)

    class Servicer(tei_pb2_grpc.EmbedServicer):
        def Embed(self, request: Any, context: Any) -> tei_pb2.EmbedResponse:
            if worker:
                vector = pool.submit(embed, request.inputs).result()
            else:
                vector = embed(request.inputs)
            return tei_pb2.EmbedResponse(embeddings=vector)

    # As many handler threads as callers, so that none waits for a thread.
    grpc_server = grpc.server(ThreadPoolExecutor(64))
    tei_pb2_grpc.add_EmbedServicer_to_server(Servicer(), grpc_server)
    grpc_server.add_insecure_port(f"127.0.0.1:{port}")
    grpc_server.start()
    threading.Event().wait()


@contextmanager
def server(layout: str, what: str, argument: str) -> Iterator[tuple[str, int]]:
    """`serve` in its own process; yields its address and pid once its channel is ready."""
    port = bench.free_port()
    command = [sys.executable, __file__, "serve", layout, str(port), what, argument]
    process = subprocess.Popen(command, cwd=bench.ROOT)
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address, process.pid
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def cpu_latency_held() -> Iterator[bool]:
    """Ask the kernel for 0 µs wake-up latency (PM QoS) while inside: idle CPUs poll
    instead of halting. Yields False where the file is missing or not writable (not root,
    or a container without it)."""
    try:
        descriptor = os.open(PM_QOS, os.O_WRONLY)
    except OSError:
        yield False
        return
    try:
        os.write(descriptor, struct.pack("i", 0))
        yield True
    finally:
        os.close(descriptor)  # the request ends when the file is closed


def cpu_per_call(layout: str, size: str, calls: int, clients: int) -> float:
    """Server CPU seconds per call, `clients` callers at once, the call answered at once."""
    with server(layout, "none", size) as (address, pid):
        process = psutil.Process(pid)
        asyncio.run(bench.concurrent(address, [LATENCY_TEXT] * (calls // 10), clients))
        before = process.cpu_times()
        asyncio.run(bench.concurrent(address, [LATENCY_TEXT] * calls, clients))
        after = process.cpu_times()
    return (after.user + after.system - before.user - before.system) / calls


def render(
    args: argparse.Namespace,
    p50: dict[str, dict[str, float]],
    cpu: dict[str, float],
    held: bool,
) -> str:
    conditions = list(p50)
    header = " | ".join(f"p50, {name} | / in-process" for name in conditions)
    lines = [
        "# The floor under localtei's one-text latency",
        "",
        f"{platform.machine()} x {bench.core_count()} CPU cores, grpcio {grpc.__version__},"
        f" {time.strftime('%Y-%m-%d %H:%M')}. Command: `python benchmarks/localtei_floor.py"
        f" --samples {args.samples} --calls {args.calls} --clients {args.clients}`.",
        "",
        "Each bare server runs only the in-process call of the first row (tokenize, the ONNX"
        " file localtei runs at ONNX Runtime's defaults, mean-pool, normalize), in its own"
        " process; the last rows are localtei on the same file, at its defaults and on"
        " asyncio's own event loop."
        f" One text, p50 over {args.samples} sequential calls of each, in blocks of 10 per side.",
        "",
        f"| the call | {header} |",
        "|---|" + "---:|---:|" * len(conditions),
    ]
    labels = {
        "in-process": "in-process, no gRPC",
        **LAYOUTS,
        "localtei": "localtei server (on uvloop, its default)",
        "localtei-asyncio": "localtei server on asyncio's loop (LOCALTEI_LOOP=asyncio)",
    }
    for name, label in labels.items():
        cells = " | ".join(
            f"{p50[c][name] * 1e3:.2f} ms | {p50[c][name] / p50[c]['in-process']:.2f}"
            for c in conditions
        )
        lines.append(f"| {label} | {cells} |")
    lines += [
        "",
        "The goal for localtei's one-text p50 is 1.3x the quickest in-process call."
        + (
            ' "Idle states held at polling": 0 written to /dev/cpu_dma_latency and held'
            " (PM QoS) while measuring, so that idle CPUs poll instead of halting."
            if held
            else " /dev/cpu_dma_latency is not writable here: no run with idle states held."
        ),
        "",
        f"Server CPU per call, {args.clients} concurrent grpc.aio callers, {args.calls} calls,"
        " each answered at once (no model):",
        "",
        "| layout | server CPU per call |",
        "|---|---:|",
        *(f"| {LAYOUTS[name]} | {cpu[name] * 1e3:.3f} ms |" for name in LAYOUTS),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
