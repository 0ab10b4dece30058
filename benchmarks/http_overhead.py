"""HTTP data plane overhead: the same instance through the multiplexer's HTTP and gRPC sides.

Starts one localtei (all-MiniLM-L6-v2) and `manage.py runmultiplexer` (gRPC and HTTP) on a
scratch database, with two Instance rows on that one process: `bench-minilm`
(max_concurrent_requests 512) and `bench-four` (4). Then, in one run:

1. one text: `/v1/embeddings` p50 against gRPC `Embed` through the multiplexer, interleaved;
2. one request of 32 texts: `/v1/embeddings` throughput against `EmbedArrow` of those texts;
3. 64 concurrent HTTP clients against 64 concurrent gRPC clients, one text per call;
4. 64 concurrent HTTP callers on `bench-four`: the share refused (429), and the throughput
   against the same callers on `bench-minilm`.

Writes benchmarks/results/http_overhead.md. Usage: python benchmarks/http_overhead.py
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import pyarrow as pa  # noqa: E402
from multiplexer_overhead import (  # sets up Django on a scratch database
    MODEL_ID,
    ROOT,
    Server,
    free_port,
    interleaved,
    ms,
    percentile,
    start_localtei,
    wait_for,
)
from tei.v1 import tei_pb2  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2 as mux  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2_grpc  # noqa: E402

from multiplexer.benchclient import generate_texts, text_batch  # noqa: E402

NAME, FOUR = "bench-minilm", "bench-four"
RESULTS = ROOT / "benchmarks" / "results" / "http_overhead.md"
TEXT = "The quick brown fox jumps over the lazy dog"
UNARY_ROUNDS = 300
BATCH, BATCH_ROUNDS = 32, 16
CONCURRENCY, CONCURRENT_CALLS, CONCURRENT_ROUNDS = 64, 640, 4


def main() -> int:
    from django.core.management import call_command

    localtei = start_localtei()
    try:
        call_command("migrate", verbosity=0)
        from instances.models import Instance

        for name, limit, metrics in ((NAME, 512, localtei.metrics), (FOUR, 4, free_port())):
            Instance.objects.create(
                name=name,
                model_id=MODEL_ID,
                port=localtei.port,
                prometheus_port=metrics,
                max_concurrent_requests=limit,
                status="running",
                node=f"bench-{limit}",  # one process, two rows: ports are unique per node
            )
        multiplexer = start_multiplexer()
        try:
            rows = measure(f"127.0.0.1:{multiplexer.port}", multiplexer.http_port)
        finally:
            multiplexer.stop()
    finally:
        localtei.stop()
    report = render(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


def measure(grpc_address: str, http_port: int) -> list[tuple[str, str, str, str, str]]:
    target = mux.Target(instance_name=NAME)
    wrapped = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs=TEXT))
    texts = generate_texts(BATCH)
    with grpc.insecure_channel(grpc_address) as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        connection = http.client.HTTPConnection("127.0.0.1", http_port)
        one = json.dumps({"model": NAME, "input": TEXT}).encode()
        calls: dict[str, Callable[[], Any]] = {
            "grpc": lambda: stub.Embed(wrapped),
            "http": lambda: post(connection, one),
        }
        for _ in range(50):
            for call in calls.values():
                call()
        latency = interleaved(calls, UNARY_ROUNDS)

        batch_body = json.dumps({"model": NAME, "input": texts}).encode()
        arrow = mux.EmbedArrowRequest(target=target, arrow_ipc=text_batch(texts), normalize=True)
        http_tp, arrow_tp = [], []
        for round_ in range(BATCH_ROUNDS):  # which goes first alternates
            runs = [
                (http_tp, lambda: post(connection, batch_body, rows=BATCH)),
                (arrow_tp, lambda: arrow_rows(stub, arrow)),
            ]
            for results, run in runs[:: 1 if round_ % 2 == 0 else -1]:
                started = time.perf_counter()
                run()
                results.append(BATCH / (time.perf_counter() - started))
        connection.close()

    payload = wrapped.SerializeToString()
    grpc_cc, http_cc = [], []
    for round_ in range(CONCURRENT_ROUNDS):
        runs = [
            (grpc_cc, lambda: grpc_concurrent(grpc_address, payload)),
            (http_cc, lambda: http_concurrent(http_port, NAME)),
        ]
        for results, run in runs[:: 1 if round_ % 2 == 0 else -1]:
            results.append(asyncio.run(run())[0])
    wide_tp, four_tp, four_refused = [], [], []
    for round_ in range(CONCURRENT_ROUNDS):
        for model in (NAME, FOUR) if round_ % 2 == 0 else (FOUR, NAME):
            throughput, refused = asyncio.run(http_concurrent(http_port, model))
            if model == FOUR:
                four_tp.append(throughput)
                four_refused.append(refused)
            else:
                wide_tp.append(throughput)

    g50, h50 = percentile(latency["grpc"], 50), percentile(latency["http"], 50)
    g90, h90 = percentile(latency["grpc"], 90), percentile(latency["http"], 90)
    htp, atp = statistics.median(http_tp), statistics.median(arrow_tp)
    gcc, hcc = statistics.median(grpc_cc), statistics.median(http_cc)
    # Throughput ratios: the median of each round's pair (drift hits a pair alike).
    batch_ratios = [h / a for h, a in zip(http_tp, arrow_tp, strict=True)]
    concurrent_ratios = [h / g for h, g in zip(http_cc, grpc_cc, strict=True)]
    batch_ratio, concurrent_ratio = (
        statistics.median(batch_ratios),
        statistics.median(concurrent_ratios),
    )
    wtp, ftp = statistics.median(wide_tp), statistics.median(four_tp)
    refused_share = sum(four_refused) / (CONCURRENT_CALLS * CONCURRENT_ROUNDS)
    return [
        row(
            "one text: `/v1/embeddings` p50 vs gRPC `Embed`",
            ms(g50),
            ms(h50),
            h50 / g50,
            f"≤ 1.10 (added {1e6 * (h50 - g50):.0f} µs)",
            h50 / g50 <= 1.10,
        ),
        row("one text: p90", ms(g90), ms(h90), h90 / g90, "–", None),
        row(
            f"one request of {BATCH} texts vs `EmbedArrow` of them, texts/s",
            f"{atp:.0f}",
            f"{htp:.0f}",
            batch_ratio,
            f"≥ 0.90 (rounds: {spread(batch_ratios)})",
            batch_ratio >= 0.90,
        ),
        row(
            f"{CONCURRENCY} concurrent clients, one text per call, calls/s",
            f"{gcc:.0f}",
            f"{hcc:.0f}",
            concurrent_ratio,
            f"≥ 0.90 (rounds: {spread(concurrent_ratios)})",
            concurrent_ratio >= 0.90,
        ),
        row(
            f"{CONCURRENCY} concurrent HTTP callers, max_concurrent_requests 4 vs 512: "
            "share refused",
            "0 %",
            f"{100 * refused_share:.1f} %",
            refused_share,
            "0",
            refused_share == 0,
        ),
        row(
            f"{CONCURRENCY} concurrent HTTP callers, max_concurrent_requests 4 vs 512: calls/s",
            f"{wtp:.0f}",
            f"{ftp:.0f}",
            ftp / wtp,
            "– (4 in flight leave the instance's batches small)",
            None,
        ),
    ]


def post(connection: http.client.HTTPConnection, body: bytes, rows: int = 1) -> None:
    connection.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    assert response.status == 200, data[:300]
    assert len(json.loads(data)["data"]) == rows


def arrow_rows(stub: Any, request: mux.EmbedArrowRequest) -> None:
    reply = stub.EmbedArrow(request, timeout=300)
    assert pa.ipc.open_stream(pa.py_buffer(reply.arrow_ipc)).read_all().num_rows == BATCH


async def grpc_concurrent(address: str, payload: bytes) -> tuple[float, int]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary("/tei_multiplexer.v1.TeiMultiplexer/Embed")
        return await run_callers(lambda: call(payload))


async def http_concurrent(port: int, model: str) -> tuple[float, int]:
    """(calls/s, calls refused) for CONCURRENT_CALLS calls from CONCURRENCY callers."""
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    body = json.dumps({"model": model, "input": TEXT}).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> bool:
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                assert response.status in (200, 429), response.status
                return response.status == 200

        return await run_callers(call)


async def run_callers(call: Callable[[], Any]) -> tuple[float, int]:
    left, refused = CONCURRENT_CALLS, 0

    async def caller() -> None:
        nonlocal left, refused
        while left > 0:
            left -= 1
            if (await call()) is False:
                refused += 1

    await asyncio.gather(*(call() for _ in range(CONCURRENCY)))  # warm the connections
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
    return CONCURRENT_CALLS / (time.perf_counter() - started), refused


def start_multiplexer() -> Server:
    """`manage.py runmultiplexer`, as `make run` starts it, with its HTTP port."""
    http_port = free_port()

    def command(port: int, metrics: int) -> list[str]:
        return [
            "manage.py", "runmultiplexer", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics), "--http-port", str(http_port),
        ]  # fmt: skip

    server = Server("multiplexer", command).wait_until_serving(60)
    server.http_port = http_port  # type: ignore[attr-defined]
    wait_for(lambda: _answers(http_port), 30)
    return server


def _answers(port: int) -> bool:
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def row(
    name: str, grpc_side: str, http_side: str, ratio: float, goal: str, met: bool | None
) -> tuple[str, str, str, str, str]:
    verdict = "" if met is None else (" ✅" if met else " ❌")
    return name, grpc_side, http_side, f"{ratio:.3f}", goal + verdict


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = [
        "# HTTP data plane overhead",
        "",
        f"Same run, same localtei instance ({MODEL_ID}, CPU), {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.machine()} × {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "Both sides go through one `manage.py runmultiplexer` (its own process, loopback, uvloop, "
        "aiohttp for HTTP). Left column: gRPC through the multiplexer (`Embed`, `EmbedArrow`), "
        "or max_concurrent_requests 512 in the last rows; right column: HTTP `/v1/embeddings`. "
        f"One text: one call of each per round in shuffled order, {UNARY_ROUNDS} rounds; "
        f"{BATCH} texts: {BATCH_ROUNDS} alternating rounds; concurrent: {CONCURRENT_ROUNDS} "
        f"alternating rounds of {CONCURRENT_CALLS} calls from {CONCURRENCY} callers (gRPC: "
        "grpc.aio, HTTP: aiohttp client, both in the benchmark's process). Throughput ratios "
        "are the median of the rounds' ratios.",
        f"Load average when done: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| measure | gRPC / 512 | HTTP / 4 | ratio | goal |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
