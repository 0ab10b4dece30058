"""The floor under the multiplexer's added latency: what one Python gRPC hop costs here.

Runs an echo server and a forwarder that only passes bytes on to it (no routing, no
metrics), each in its own process, for grpcio's asyncio server (on asyncio's own loop and
on uvloop's) and its thread-pool server, and measures unary p50 latency direct and through
the forwarder with 100-byte messages, the calls of all paths interleaved.

Writes benchmarks/results/grpc_hop_floor.md. Usage: python benchmarks/grpc_hop_floor.py

`python benchmarks/grpc_hop_floor.py forward PORT UPSTREAM` runs the uvloop forwarder
alone (every unary method passed on as bytes); multiplexer_overhead.py measures it next to
the multiplexer.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from functools import partial
from pathlib import Path
from typing import Any

import grpc

RESULT = Path(__file__).resolve().parent / "results" / "grpc_hop_floor.md"
ROUNDS, WARM_UP = 2000, 200
PAYLOAD = b"x" * 100
KINDS = ("asyncio", "asyncio + uvloop", "thread pool")


def main() -> None:
    echo_port = free_port()
    ports = {kind: free_port() for kind in KINDS}
    processes = [
        multiprocessing.Process(target=serve, args=("asyncio", echo_port, None), daemon=True),
        *(
            multiprocessing.Process(
                target=serve, args=(kind, port, f"127.0.0.1:{echo_port}"), daemon=True
            )
            for kind, port in ports.items()
        ),
    ]
    for process in processes:
        process.start()
    try:
        spent = p50_micros({"direct": echo_port, **ports})
    finally:
        for process in processes:
            process.terminate()
    direct = spent["direct"]
    lines = [
        "# Python gRPC hop floor",
        "",
        f"{platform.machine()} x {len(os.sched_getaffinity(0))} CPUs, grpcio {grpc.__version__},"
        f" {time.strftime('%Y-%m-%d %H:%M')}; {ROUNDS} rounds of sequential unary calls of"
        f" {len(PAYLOAD)} bytes, one call per path per round in shuffled order; the echo"
        " server (asyncio) and each forwarder in its own process.",
        "",
        f"Direct to the echo server: p50 {direct:.0f} µs.",
        "",
        "| forwarder | p50 through it | added |",
        "|---|---:|---:|",
        *(f"| {kind} | {spent[kind]:.0f} µs | {spent[kind] - direct:.0f} µs |" for kind in KINDS),
        "",
    ]
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text("\n".join(lines))
    print("\n".join(lines))


def p50_micros(ports: dict[str, int]) -> dict[str, float]:
    calls: dict[str, Callable[[bytes], Any]] = {}
    for name, port in ports.items():
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        calls[name] = channel.unary_unary("/echo.Echo/Echo")
    for call in calls.values():
        for _ in range(WARM_UP):
            call(PAYLOAD)
    spent = interleaved({name: partial(call, PAYLOAD) for name, call in calls.items()}, ROUNDS)
    return {name: statistics.median(values) * 1e6 for name, values in spent.items()}


def interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Each round makes one call of each kind, in shuffled order: drift hits all alike."""
    spent: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for _ in range(rounds):
        random.shuffle(order)
        for name in order:
            started = time.perf_counter()
            calls[name]()
            spent[name].append(time.perf_counter() - started)
    return spent


def serve(kind: str, port: int, forward_to: str | None) -> None:
    if kind == "thread pool":
        serve_thread_pool(port, forward_to)
    elif kind == "asyncio + uvloop":
        import uvloop

        uvloop.run(serve_asyncio(port, forward_to))
    else:
        asyncio.run(serve_asyncio(port, forward_to))


def serve_thread_pool(port: int, forward_to: str | None) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    upstream = grpc.insecure_channel(forward_to) if forward_to else None

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            if upstream is None:
                return grpc.unary_unary_rpc_method_handler(lambda request, _: request)
            call = upstream.unary_unary(details.method)
            return grpc.unary_unary_rpc_method_handler(lambda request, _: call(request))

    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    threading.Event().wait()


async def serve_asyncio(port: int, forward_to: str | None) -> None:
    """Echo every unary call, or pass it on as bytes to `forward_to` (any method path)."""
    server = grpc.aio.server()
    upstream = grpc.aio.insecure_channel(forward_to) if forward_to else None

    class Handler(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            call = upstream.unary_unary(details.method) if upstream else None

            async def handle(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
                return await call(request) if call else request

            return grpc.unary_unary_rpc_method_handler(handle)

    server.add_generic_rpc_handlers((Handler(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        serve("asyncio + uvloop", int(sys.argv[2]), sys.argv[3])
    else:
        main()
