"""localtei throughput and latency against the same model run in-process.

    .venv/bin/python benchmarks/localtei_throughput.py [--texts 2000] [--clients 32]

(a) in-process: `localtei.model.load_model(...).embed(texts, batch_size=32)`, the code
    path the server runs, without gRPC;
(b) the same texts as `--clients` concurrent unary Embed calls to a `python -m localtei`;
(c) one-text latency (p50) both ways.
(a) and (b) alternate for `--rounds` rounds and the latency samples alternate call by call,
so that neighbours loading a shared machine weigh on both sides alike; the table shows
medians over rounds. Both sides use localtei's torch thread policy (`default_num_threads`).
Writes benchmarks/results/localtei_throughput.md and prints it. Goals on a 2-core box:
(b)/(a) >= 0.90 and (c) server / in-process <= 1.3.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for entry in (ROOT, ROOT / "proto"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
import psutil  # noqa: E402
from tei.v1 import tei_pb2, tei_pb2_grpc  # noqa: E402

from tests.localtei_fixtures import MINILM_ID, localtei_env, start_localtei  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "localtei_throughput.md"
LATENCY_TEXT = "How fast does one short sentence come back?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=100)
    args = parser.parse_args()

    import torch

    from localtei.model import default_num_threads, load_model

    texts = make_texts(args.texts)
    threads = default_num_threads()
    torch.set_num_threads(threads)
    env = localtei_env(LOCALTEI_NUM_THREADS=str(threads))
    # The server starts first: while the in-process side runs, it idles and costs nothing.
    with start_localtei(MINILM_ID, env=env) as server:
        rss_mb = psutil.Process(server.proc.pid).memory_info().rss / 2**20
        model = load_model(MINILM_ID)
        model.embed(texts[:64], batch_size=args.batch_size)  # warm-up
        tokens = statistics.mean(len(model.tokenizer.encode(t).ids) for t in texts)
        with server.channel() as channel:
            stub = tei_pb2_grpc.EmbedStub(channel)
            for text in texts[:64]:  # warm-up
                stub.Embed(tei_pb2.EmbedRequest(inputs=text))
            local_rates, server_rates = [], []
            for round_number in range(args.rounds):
                started = time.perf_counter()
                model.embed(texts, batch_size=args.batch_size)
                local_rates.append(len(texts) / (time.perf_counter() - started))
                server_rates.append(
                    asyncio.run(run_concurrent(server.address, texts, args.clients))
                )
                print(
                    f"round {round_number + 1}: in-process {local_rates[-1]:.1f} texts/s, "
                    f"server {server_rates[-1]:.1f} texts/s",
                    flush=True,
                )
            local_p50, server_p50 = paired_latency_p50(
                lambda: model.embed([LATENCY_TEXT]),
                lambda: stub.Embed(tei_pb2.EmbedRequest(inputs=LATENCY_TEXT)),
                args.latency_samples,
            )
        rss_after_mb = psutil.Process(server.proc.pid).memory_info().rss / 2**20

    report = render(
        args,
        threads,
        tokens,
        local_rates,
        server_rates,
        local_p50,
        server_p50,
        rss_mb,
        rss_after_mb,
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)


def make_texts(count: int) -> list[str]:
    """Short English-like sentences (about 12-20 tokens), varied, reproducible."""
    rng = random.Random(0)
    subjects = ["The server", "A small model", "This sentence", "Every request", "The batch"]
    verbs = ["embeds", "describes", "returns", "compares", "measures", "tokenizes"]
    objects = ["short texts", "the latency", "many vectors", "a search query", "documents"]
    tails = ["on a CPU", "in one pass", "with care", "for the benchmark", "every second"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} "
        f"{rng.choice(tails)}, item {i} of {count}."
        for i in range(count)
    ]


async def run_concurrent(address: str, texts: list[str], clients: int) -> float:
    """`clients` callers, each sending its next text as soon as its last one is answered."""
    channel = grpc.aio.insecure_channel(address)
    stub = tei_pb2_grpc.EmbedStub(channel)
    pending = iter(texts)
    answered = 0

    async def client() -> None:
        nonlocal answered
        for text in pending:
            response = await stub.Embed(tei_pb2.EmbedRequest(inputs=text))
            assert len(response.embeddings) == 384
            answered += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    await channel.close()
    assert answered == len(texts)
    return len(texts) / elapsed


def paired_latency_p50(
    local: Callable[[], object], remote: Callable[[], object], samples: int
) -> tuple[float, float]:
    """Median seconds per call of each, alternating calls so both see the same machine."""
    local_timings, remote_timings = [], []
    for _ in range(samples):
        for call, timings in ((local, local_timings), (remote, remote_timings)):
            started = time.perf_counter()
            call()
            timings.append(time.perf_counter() - started)
    return statistics.median(local_timings), statistics.median(remote_timings)


def render(
    args: argparse.Namespace,
    threads: int,
    tokens: float,
    local_rates: list[float],
    server_rates: list[float],
    local_p50: float,
    server_p50: float,
    rss_mb: float,
    rss_after_mb: float,
) -> str:
    local_rate = statistics.median(local_rates)
    server_rate = statistics.median(server_rates)
    ratios = [remote / local for remote, local in zip(server_rates, local_rates, strict=True)]
    throughput_ratio = statistics.median(ratios)
    rounds = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    latency_ratio = server_p50 / local_p50
    verdict = {True: "met", False: "NOT met"}
    return "\n".join(
        [
            "# localtei throughput",
            "",
            f"Model `{MINILM_ID}`, {args.texts} texts of about {tokens:.0f} tokens, "
            f"{threads} torch threads, {len(os.sched_getaffinity(0))} CPU cores "
            f"({platform.processor() or platform.machine()}), "
            f"{time.strftime('%Y-%m-%d %H:%M')}.",
            "",
            "| measure | in-process | localtei server | server / in-process | goal |",
            "|---|---:|---:|---:|---|",
            f"| throughput, texts/s (in-process batch {args.batch_size}; server "
            f"{args.clients} concurrent unary Embed) | {local_rate:.1f} | {server_rate:.1f} "
            f"| {throughput_ratio:.2f} | >= 0.90: {verdict[throughput_ratio >= 0.9]} |",
            f"| one-text latency p50, ms ({args.latency_samples} sequential calls) "
            f"| {local_p50 * 1000:.2f} | {server_p50 * 1000:.2f} | {latency_ratio:.2f} "
            f"| <= 1.3: {verdict[latency_ratio <= 1.3]} |",
            "",
            f"Throughput: medians over {args.rounds} alternating rounds; ratio per round: "
            f"{rounds}. Load average at the end: {os.getloadavg()[0]:.1f} "
            "(other work on the machine slows both sides).",
            "",
            f"Server RSS after warm-up: {rss_mb:.0f} MiB (after the run: {rss_after_mb:.0f} MiB).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
