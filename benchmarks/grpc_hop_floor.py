"""The floor under the multiplexer's added latency: what one Python gRPC hop costs here.

Runs an echo server and a forwarder that only passes bytes on to it (no routing, no
metrics), each in its own process, for both grpcio's asyncio and thread-pool servers, and
measures unary p50 latency direct and through the forwarder with 100-byte messages.

Writes benchmarks/results/grpc_hop_floor.md. Usage: python benchmarks/grpc_hop_floor.py
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import socket
import statistics
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

RESULT = Path(__file__).resolve().parent / "results" / "grpc_hop_floor.md"
CALLS, WARM_UP = 2000, 200
PAYLOAD = b"x" * 100


def main() -> None:
    rows = [measure_kind(kind) for kind in ("asyncio", "thread pool")]
    lines = [
        "# Python gRPC hop floor",
        "",
        f"{platform.machine()} x {len(os.sched_getaffinity(0))} CPUs, grpcio {grpc.__version__},"
        f" {time.strftime('%Y-%m-%d %H:%M')}; {CALLS} sequential unary calls of"
        f" {len(PAYLOAD)} bytes, echo server and forwarder each in its own process.",
        "",
        "| server kind | direct p50 | through a bytes-only forwarder p50 | added |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {d:.0f} µs | {f:.0f} µs | {f - d:.0f} µs |" for k, d, f in rows),
        "",
    ]
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text("\n".join(lines))
    print("\n".join(lines))


def measure_kind(kind: str) -> tuple[str, float, float]:
    echo_port, forward_port = free_port(), free_port()
    processes = [
        multiprocessing.Process(target=serve, args=(kind, echo_port, None), daemon=True),
        multiprocessing.Process(
            target=serve, args=(kind, forward_port, f"127.0.0.1:{echo_port}"), daemon=True
        ),
    ]
    for process in processes:
        process.start()
    try:
        return kind, p50_micros(echo_port), p50_micros(forward_port)
    finally:
        for process in processes:
            process.terminate()


def p50_micros(port: int) -> float:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        call = channel.unary_unary("/echo.Echo/Echo")
        for _ in range(WARM_UP):
            call(PAYLOAD)
        spent = []
        for _ in range(CALLS):
            started = time.perf_counter()
            call(PAYLOAD)
            spent.append(time.perf_counter() - started)
    return statistics.median(spent) * 1e6


def serve(kind: str, port: int, forward_to: str | None) -> None:
    if kind == "asyncio":
        asyncio.run(serve_asyncio(port, forward_to))
        return
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    if forward_to:
        upstream = grpc.insecure_channel(forward_to).unary_unary("/echo.Echo/Echo")
        handler = grpc.unary_unary_rpc_method_handler(lambda request, _: upstream(request))
    else:
        handler = grpc.unary_unary_rpc_method_handler(lambda request, _: request)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("echo.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    threading.Event().wait()


async def serve_asyncio(port: int, forward_to: str | None) -> None:
    server = grpc.aio.server()
    upstream = grpc.aio.insecure_channel(forward_to) if forward_to else None
    forward = upstream.unary_unary("/echo.Echo/Echo") if upstream else None

    async def echo(request: bytes, _: grpc.aio.ServicerContext) -> bytes:
        return await forward(request) if forward else request

    handler = grpc.unary_unary_rpc_method_handler(echo)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("echo.Echo", {"Echo": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
