"""Multiplexer overhead: the same calls to the same localtei instance, direct and routed.

Starts one localtei (all-MiniLM-L6-v2) and `manage.py runmultiplexer` on a scratch database,
then measures, interleaving the two paths so that drift hits both alike:

- unary Embed latency (p50, p90), one call at a time, also through a forwarder that only
  passes bytes on (benchmarks/grpc_hop_floor.py: the floor of one Python gRPC hop);
- 16 concurrent callers: Embed throughput;
- a 20-message EmbedStream: time to the last answer;
- EmbedArrow throughput against the model called in-process on the same texts;
- the API key check: the same Info call through two multiplexers in the same run, one open
  (TEI_MANAGER_AUTH_REQUIRED=false) and one that checks the call's key, interleaved; and the
  check alone, in-process (multiplexer/keys.py's Keyring.check, a cached key).

Writes benchmarks/results/multiplexer_overhead.md. Usage: python benchmarks/multiplexer_overhead.py
"""

from __future__ import annotations

import asyncio
import os
import platform
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
SCRATCH = Path(tempfile.mkdtemp(prefix="multiplexer-bench-"))
os.environ["TEI_MANAGER_STATE_FILE"] = str(SCRATCH / "state.sqlite3")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import django  # noqa: E402

django.setup()

import grpc  # noqa: E402
import pyarrow as pa  # noqa: E402
from django.core.management import call_command  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_hop_floor import free_port, interleaved  # noqa: E402
from tei.v1 import tei_pb2, tei_pb2_grpc  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2 as mux  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2_grpc  # noqa: E402

from multiplexer.benchclient import generate_texts, text_batch  # noqa: E402

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
NAME = "bench-minilm"
RESULTS = ROOT / "benchmarks" / "results" / "multiplexer_overhead.md"
TEXT = "The quick brown fox jumps over the lazy dog"
UNARY_ROUNDS = 400
CONCURRENCY, CONCURRENT_CALLS, CONCURRENT_ROUNDS = 16, 480, 6
STREAM_MESSAGES, STREAM_REPEATS = 20, 15
ARROW_TEXTS, ARROW_BATCH, ARROW_ROUNDS = 1024, 512, 3
KEY_ROUNDS, KEY_CHECKS = 2000, 200_000
KEY_CHECK_GOAL_US = 20.0


def main() -> int:
    localtei = start_localtei()
    try:
        call_command("migrate", verbosity=0)
        from instances.models import Instance

        Instance.objects.create(
            name=NAME,
            model_id=MODEL_ID,
            port=localtei.port,
            prometheus_port=localtei.metrics,
            status="running",
            node="bench",
        )
        direct = f"127.0.0.1:{localtei.port}"
        multiplexer, forwarder = start_multiplexer(), start_forwarder(direct)
        try:
            rows = measure(direct, f"127.0.0.1:{multiplexer.port}", f"127.0.0.1:{forwarder.port}")
        finally:
            multiplexer.stop()
            forwarder.stop()
        rows += measure_key_check()
    finally:
        localtei.stop()
    report = render(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report)
    print(report)
    return 0


def measure(direct: str, routed: str, forwarded: str) -> list[tuple[str, str, str, str, str]]:
    target = mux.Target(instance_name=NAME)
    inner = tei_pb2.EmbedRequest(inputs=TEXT)
    wrapped = mux.EmbedRequest(target=target, request=inner)
    with (
        grpc.insecure_channel(direct) as d_channel,
        grpc.insecure_channel(routed) as r_channel,
        grpc.insecure_channel(forwarded) as f_channel,
    ):
        d_embed = tei_pb2_grpc.EmbedStub(d_channel)
        r_stub = multiplexer_pb2_grpc.TeiMultiplexerStub(r_channel)
        f_embed = tei_pb2_grpc.EmbedStub(f_channel)
        unary: dict[str, Callable[[], Any]] = {
            "direct": lambda: d_embed.Embed(inner),
            "routed": lambda: r_stub.Embed(wrapped),
            "forwarded": lambda: f_embed.Embed(inner),
        }
        for _ in range(50):
            for call in unary.values():
                call()
        lat = interleaved(unary, UNARY_ROUNDS)
        d_lat, r_lat, f_lat = lat["direct"], lat["routed"], lat["forwarded"]

        d_tp, r_tp = [], []
        for round_ in range(CONCURRENT_ROUNDS):  # which path goes first alternates
            runs = [
                (d_tp, lambda: concurrent(direct, "/tei.v1.Embed/Embed", inner)),
                (
                    r_tp,
                    lambda: concurrent(routed, "/tei_multiplexer.v1.TeiMultiplexer/Embed", wrapped),
                ),
            ]
            for results, run in runs[:: 1 if round_ % 2 == 0 else -1]:
                results.append(asyncio.run(run()))

        d_inners = [tei_pb2.EmbedRequest(inputs=f"{TEXT} {i}") for i in range(STREAM_MESSAGES)]
        r_wrapped = [mux.EmbedRequest(target=target, request=m) for m in d_inners]
        d_stream: list[float] = []
        r_stream: list[float] = []
        for _ in range(STREAM_REPEATS):
            d_stream += timings(lambda: list(d_embed.EmbedStream(iter(d_inners))), 1)
            r_stream += timings(lambda: list(r_stub.EmbedStream(iter(r_wrapped))), 1)

        texts = generate_texts(ARROW_TEXTS)
        model = load_in_process_model()
        model.embed(texts[:64])
        rows_direct = [tei_pb2.EmbedRequest(inputs=t, normalize=True) for t in texts]
        arrow_tp, local_tp, stream_tp = [], [], []
        for _ in range(ARROW_ROUNDS):
            started = time.perf_counter()
            assert len(list(d_embed.EmbedStream(iter(rows_direct), timeout=300))) == len(texts)
            stream_tp.append(len(texts) / (time.perf_counter() - started))
            arrow_tp.append(arrow_throughput(r_stub, target, texts))
            started = time.perf_counter()
            model.embed(texts, normalize=True, batch_size=ARROW_BATCH)
            local_tp.append(len(texts) / (time.perf_counter() - started))

    d50, r50, f50 = percentile(d_lat, 50), percentile(r_lat, 50), percentile(f_lat, 50)
    d90, r90 = percentile(d_lat, 90), percentile(r_lat, 90)
    dtp, rtp = statistics.median(d_tp), statistics.median(r_tp)
    tp_ratios = [r / d for d, r in zip(d_tp, r_tp, strict=True)]
    arrow_ratios = [a / local for a, local in zip(arrow_tp, local_tp, strict=True)]
    ds, rs = statistics.median(d_stream), statistics.median(r_stream)
    atp, ltp = statistics.median(arrow_tp), statistics.median(local_tp)
    stp = statistics.median(stream_tp)
    return [
        row(
            "unary Embed p50",
            ms(d50),
            ms(r50),
            r50 / d50,
            f"≤ 1.05 and ≤ 250 µs added (added {1e6 * (r50 - d50):.0f} µs)",
            r50 / d50 <= 1.05 and r50 - d50 <= 250e-6,
        ),
        row("unary Embed p90", ms(d90), ms(r90), r90 / d90, "–", None),
        row(
            "unary Embed p50, bytes-only forwarder in place of the multiplexer",
            ms(d50),
            ms(f50),
            f50 / d50,
            f"– (the floor of one Python gRPC hop: added {1e6 * (f50 - d50):.0f} µs)",
            None,
        ),
        row(
            f"{CONCURRENCY} concurrent callers, Embed/s",
            f"{dtp:.0f}",
            f"{rtp:.0f}",
            rtp / dtp,
            f"≥ 0.95 (rounds: {spread(tp_ratios)})",
            rtp / dtp >= 0.95,
        ),
        row(f"{STREAM_MESSAGES}-message EmbedStream", ms(ds), ms(rs), rs / ds, "–", None),
        row(
            f"EmbedArrow ({ARROW_BATCH} rows/call) vs in-process model, texts/s",
            f"{ltp:.0f}",
            f"{atp:.0f}",
            atp / ltp,
            f"≥ 0.90 (rounds: {spread(arrow_ratios)})",
            atp / ltp >= 0.90,
        ),
        row(
            "EmbedArrow vs the same rows as one direct EmbedStream, texts/s",
            f"{stp:.0f}",
            f"{atp:.0f}",
            atp / stp,
            "–",
            None,
        ),
    ]


def measure_key_check() -> list[tuple[str, str, str, str, str]]:
    """Info through an open multiplexer and through one that checks a key, interleaved;
    then Keyring.check alone, in this process, against the same table."""
    from access import keys

    secret = keys.create_key("bench", ["inference"]).secret  # the fleet is protected now
    keyed = (("authorization", f"Bearer {secret}"),)
    info = mux.InfoRequest(target=mux.Target(instance_name=NAME))
    # Two open multiplexers and a keyed one: the two open ones tell how far apart two
    # processes doing the same work land, the noise the keyed one is read against.
    servers = [start_multiplexer(TEI_MANAGER_AUTH_REQUIRED="false") for _ in range(2)]
    servers.append(start_multiplexer())
    try:
        channels = [grpc.insecure_channel(f"127.0.0.1:{s.port}") for s in servers]
        stubs = [multiplexer_pb2_grpc.TeiMultiplexerStub(c) for c in channels]
        calls: dict[str, Callable[[], Any]] = {
            "open": lambda: stubs[0].Info(info),
            "open too": lambda: stubs[1].Info(info),
            "keyed": lambda: stubs[2].Info(info, metadata=keyed),
        }
        for _ in range(200):
            for call in calls.values():
                call()
        lat = interleaved(calls, KEY_ROUNDS)
        for channel in channels:
            channel.close()
    finally:
        for server in servers:
            server.stop()
    o50, t50, k50 = (percentile(lat[name], 50) for name in ("open", "open too", "keyed"))
    check_us, open_us, first_us = in_process_key_check(secret)
    return [
        row(
            "Info p50, no key (open) vs a key checked",
            ms(o50),
            ms(k50),
            k50 / o50,
            f"– (added {1e6 * (k50 - o50):.0f} µs end to end; a second open multiplexer "
            f"differs from the first by {1e6 * (t50 - o50):.0f} µs)",
            None,
        ),
        row(
            "the first call of a key (verified against its SHA-512 hash, then cached)",
            f"{open_us:.2f} µs (open)",
            f"{first_us:.2f} µs",
            first_us / open_us,
            "– (once per key and table change)",
            None,
        ),
        row(
            "the key check alone (Keyring.check, cached key), per call",
            f"{open_us:.2f} µs (open)",
            f"{check_us:.2f} µs",
            check_us / open_us,
            f"≤ {KEY_CHECK_GOAL_US:g} µs added per call (added {check_us - open_us:.2f} µs)",
            check_us - open_us <= KEY_CHECK_GOAL_US,
        ),
    ]


def in_process_key_check(secret: str) -> tuple[float, float, float]:
    """µs per Keyring.check: a protected fleet and a cached key; an open fleet (no check);
    a key not yet cached (verified against its hash)."""
    from multiplexer.keys import Keyring, load_key_table

    keyed, open_ring = Keyring("auto"), Keyring("false")
    keyed.update(load_key_table())
    open_ring.update(load_key_table())
    results = []
    for ring, presented in ((keyed, secret), (open_ring, None)):
        check = ring.check
        check(presented)
        rounds = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(KEY_CHECKS):
                check(presented)
            rounds.append((time.perf_counter() - started) / KEY_CHECKS * 1e6)
        results.append(statistics.median(rounds))
    cache = keyed._verified
    started = time.perf_counter()
    for _ in range(KEY_CHECKS // 10):
        cache.clear()
        keyed.check(secret)
    first = (time.perf_counter() - started) / (KEY_CHECKS // 10) * 1e6
    return results[0], results[1], first


def timings(call: Callable[[], Any], count: int) -> list[float]:
    spent = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        spent.append(time.perf_counter() - started)
    return spent


async def concurrent(address: str, path: str, request: Any) -> float:
    payload = request.SerializeToString()
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(path)
        left = CONCURRENT_CALLS

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await call(payload)

        await asyncio.gather(*(call(payload) for _ in range(CONCURRENCY)))  # warm
        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(CONCURRENCY)))
        return CONCURRENT_CALLS / (time.perf_counter() - started)


def arrow_throughput(stub: Any, target: mux.Target, texts: list[str]) -> float:
    batches = [text_batch(texts[i : i + ARROW_BATCH]) for i in range(0, len(texts), ARROW_BATCH)]
    started = time.perf_counter()
    rows = 0
    for batch in batches:
        reply = stub.EmbedArrow(
            mux.EmbedArrowRequest(target=target, arrow_ipc=batch, normalize=True), timeout=300
        )
        rows += pa.ipc.open_stream(pa.py_buffer(reply.arrow_ipc)).read_all().num_rows
    assert rows == len(texts)
    return rows / (time.perf_counter() - started)


def load_in_process_model() -> Any:
    import torch

    from localtei.model import default_num_threads, load_model

    # The same thread count as the instance: like is compared with like.
    torch.set_num_threads(default_num_threads())
    model = load_model(MODEL_ID)
    model.warm_up()
    return model


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.2f}–{max(ratios):.2f}"


def percentile(values: list[float], pct: int) -> float:
    return statistics.quantiles(values, n=100)[pct - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def row(
    name: str, direct: str, routed: str, ratio: float, goal: str, met: bool | None
) -> tuple[str, str, str, str, str]:
    verdict = "" if met is None else (" ✅" if met else " ❌")
    return name, direct, routed, f"{ratio:.3f}", goal + verdict


def render(rows: list[tuple[str, str, str, str, str]]) -> str:
    lines = [
        "# Multiplexer overhead",
        "",
        f"Same run, same localtei instance ({MODEL_ID}, CPU), {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{platform.machine()} × {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "Direct = the instance's own port; routed = through `manage.py runmultiplexer` "
        "(its own process, plaintext, loopback, uvloop). Unary calls: one of each path per "
        f"round in shuffled order, {UNARY_ROUNDS} rounds. For Arrow, direct = the model called "
        "in-process (`localtei.model.Model.embed`) in batches of the same size. Keys: "
        f"{KEY_ROUNDS} interleaved rounds of Info through two multiplexers of this run, one "
        "open and one checking an inference key; the check alone is timed in-process over "
        f"{KEY_CHECKS} calls (median of 5).",
        f"Load average when done: {', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| measure | direct | via multiplexer | ratio | goal |",
        "|---|---|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
    ]
    return "\n".join(lines)


class Server:
    """A server subprocess of the benchmark: a free port, a log in the scratch directory."""

    def __init__(self, name: str, command: Callable[[int, int], list[str]], **env: str) -> None:
        self.port, self.metrics = free_port(), free_port()
        self.log = SCRATCH / f"{name}.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command(self.port, self.metrics)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}", **env},
            )

    def wait_until_serving(self, timeout: float = 180) -> Server:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def serving() -> bool:
                if self.process.poll() is not None:
                    raise SystemExit(f"a server exited; see {self.log}")
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                except grpc.RpcError:
                    return False
                return reply.status == health_pb2.HealthCheckResponse.SERVING

            wait_for(serving, timeout)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_localtei() -> Server:
    def command(port: int, metrics: int) -> list[str]:
        return [
            "-m", "localtei", "--model-id", MODEL_ID, "--hostname", "127.0.0.1",
            "--port", str(port), "--prometheus-port", str(metrics),
        ]  # fmt: skip

    return Server("localtei", command).wait_until_serving()


def start_multiplexer(**env: str) -> Server:
    """`manage.py runmultiplexer`, as `make run` starts it, on the scratch database."""

    def command(port: int, metrics: int) -> list[str]:
        return [
            "manage.py", "runmultiplexer", "--host", "127.0.0.1", "--port", str(port),
            "--metrics-port", str(metrics), "--http-port", "0",
        ]  # fmt: skip

    return Server("multiplexer", command, **env).wait_until_serving(60)


def start_forwarder(upstream: str) -> Server:
    """benchmarks/grpc_hop_floor.py's uvloop forwarder: bytes in, bytes out, nothing else."""

    def command(port: int, metrics: int) -> list[str]:
        return [str(ROOT / "benchmarks" / "grpc_hop_floor.py"), "forward", str(port), upstream]

    return Server("forwarder", command).wait_until_serving(60)


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the benchmark's servers")
        time.sleep(0.05)


if __name__ == "__main__":
    raise SystemExit(main())
