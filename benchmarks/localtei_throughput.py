"""localtei against the fastest in-process engine on the same texts, in one run.

    .venv/bin/python benchmarks/localtei_throughput.py [--texts 2000] [--clients 32]

Measured, in alternating rounds so that neighbours loading a shared machine weigh on
every side alike (the table shows medians over rounds):

- in-process torch and in-process ONNX Runtime: `localtei.model.load_model(...,
  backend=...).embed(texts, batch_size=32)`, every core (the code path the server runs,
  without gRPC);
- in-process ONNX Runtime at its defaults, as a user would write it: the same ONNX file,
  `InferenceSession(path)` with default options (every core, spinning threads), the
  tokenizer, mean pooling and normalizing in numpy, batch 32;
- for reference, in-process ONNX Runtime laid out as the server runs under load: one
  single-threaded run per core side by side, batch 16 each (not one of the goal's
  baselines, which are "every core, batch 32");
- the localtei server at its defaults (`python -m localtei --model-id ...`: ONNX Runtime,
  every core) with `--clients` concurrent unary Embed callers;
- EmbedArrow of all the texts in one call through `manage.py runmultiplexer`, routed to
  that server;
- one-text latency p50 every way, in blocks of 10 calls per side with a pause between
  blocks (so that threads one side leaves spinning do not slow the next);
- for reference, the floor under the server's one-text p50: a bare grpc.aio Embed
  servicer on uvloop, in its own process, that tokenizes, runs the same ONNX file at ONNX
  Runtime's defaults and pools inline on its event loop (no batcher, no worker threads, no
  metrics: the quickest of the layouts benchmarks/localtei_floor.py compares);
  `python benchmarks/localtei_throughput.py bare-server PORT ONNX_FILE TOKENIZER_JSON`
  runs it alone;
- for reference, gRPC's own cost around a call of that length: the same bare servicer
  with no model, whose call only waits as long as the in-process call takes
  (`... waiting-server PORT SECONDS SIZE`);
- each server's RSS after warm-up, `--backend torch` and the default (ONNX Runtime).

Goals against the fastest in-process engine: server throughput >= 0.90x, one-text p50
<= 1.3x, EmbedArrow through the multiplexer >= 0.85x. Writes
benchmarks/results/localtei_throughput.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for entry in (ROOT, ROOT / "proto"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
SCRATCH = Path(tempfile.mkdtemp(prefix="localtei-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TEI_MANAGER_STATE_FILE"] = str(SCRATCH / "state.sqlite3")
# 2,000 texts in one EmbedArrow call may take longer than the default 30 s on a busy box.
(SCRATCH / "config.toml").write_text("grpc_request_timeout_secs = 600\n")
os.environ["TEI_MANAGER_CONFIG"] = str(SCRATCH / "config.toml")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")

import django  # noqa: E402

django.setup()

import grpc  # noqa: E402
import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import uvloop  # noqa: E402
from django.core.management import call_command  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tei.v1 import tei_pb2, tei_pb2_grpc  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2 as mux  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2_grpc  # noqa: E402

from localtei.settings import core_count  # noqa: E402
from multiplexer.benchclient import text_batch  # noqa: E402
from tests.localtei_fixtures import (  # noqa: E402
    MINILM_ID,
    LocalTEI,
    free_port,
    localtei_env,
    minilm_path,
    start_localtei,
)

RESULTS = ROOT / "benchmarks" / "results" / "localtei_throughput.md"
LATENCY_TEXT = "How fast does one short sentence come back?"
INSTANCE = "bench-minilm"
NAMES = {
    "torch": "in-process torch",
    "onnx": "in-process ONNX Runtime (localtei's engine)",
    "plain": "in-process ONNX Runtime at its defaults",
    "side_by_side": "in-process ONNX Runtime, side by side",
    "server": "localtei server",
    "arrow": "EmbedArrow through the multiplexer",
    "bare": "a bare Python gRPC Embed server",
    "waiting": "a bare Python gRPC Embed server that only waits",
}
# What the goals are measured against: every core, batch 32 (the definition).
BASELINES = ("torch", "onnx", "plain")


def main() -> None:
    if sys.argv[1:2] == ["bare-server"]:
        port, onnx_file, tokenizer_file = sys.argv[2:5]
        uvloop.run(serve_bare(int(port), model_call(onnx_file, tokenizer_file)))
        return
    if sys.argv[1:2] == ["waiting-server"]:
        port, seconds, size = sys.argv[2:5]
        uvloop.run(serve_bare(int(port), waiting_call(float(seconds), int(size))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=100)
    args = parser.parse_args()

    from localtei.model import load_model

    texts = make_texts(args.texts)
    # The server at its defaults: no thread count from the test environment.
    env = localtei_env()
    env.pop("LOCALTEI_NUM_THREADS", None)
    rss: dict[str, float] = {}
    with start_localtei(MINILM_ID, "--backend", "torch", env=env) as torch_server:
        rss["torch"] = warmed_up_rss(torch_server, texts)
    with (
        ExitStack() as stack,
        start_localtei(MINILM_ID, env=env) as server,
        multiplexer_for(server) as routed,
        server.channel() as channel,
        grpc.insecure_channel(routed) as routed_channel,
    ):
        rss["onnx"] = warmed_up_rss(server, texts)
        engines = {
            "torch": load_model(MINILM_ID, backend="torch"),
            "onnx": load_model(MINILM_ID, backend="onnx"),
        }
        threads = {name: model.engine.threads for name, model in engines.items()}
        plain = PlainOnnx.of(engines["onnx"])
        tokenizer_file = str(minilm_path() / "tokenizer.json")
        bare = stack.enter_context(bare_server("bare-server", plain.path, tokenizer_file))
        # The in-process call's length now, for the server that only waits that long.
        wait = latency_p50({"plain": lambda: plain.embed([LATENCY_TEXT], 1)}, 50)["plain"]
        size = str(engines["onnx"].output_size)
        waiting = stack.enter_context(bare_server("waiting-server", f"{wait:.6f}", size))
        for model in engines.values():
            model.embed(texts[:64], batch_size=args.batch_size)  # warm-up
        plain.embed(texts[:64], args.batch_size)
        plain.embed(texts[:64], args.batch_size // 2, plain.narrow)
        tokens = statistics.mean(len(engines["onnx"].tokenizer.encode(t).ids) for t in texts)
        arrow = arrow_caller(routed_channel, texts)
        arrow()  # warm-up
        runs: dict[str, Callable[[], float]] = {
            "torch": lambda: in_process(engines["torch"], texts, args.batch_size),
            "onnx": lambda: in_process(engines["onnx"], texts, args.batch_size),
            "plain": lambda: plain.rate(texts, args.batch_size),
            "side_by_side": lambda: plain.side_by_side_rate(texts, args.batch_size // 2),
            "server": lambda: asyncio.run(concurrent(server.address, texts, args.clients)),
            "arrow": arrow,
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for round_number in range(args.rounds):
            order = list(runs)
            order = order[round_number % len(order) :] + order[: round_number % len(order)]
            for name in order:
                time.sleep(0.2)  # let threads the last side left spinning go to sleep
                rates[name].append(runs[name]())
            print(
                f"round {round_number + 1}: "
                + ", ".join(f"{name} {rates[name][-1]:.0f} texts/s" for name in runs),
                flush=True,
            )
        stub = tei_pb2_grpc.EmbedStub(channel)
        info = tei_pb2_grpc.InfoStub(channel)
        bare_stub = tei_pb2_grpc.EmbedStub(stack.enter_context(grpc.insecure_channel(bare)))
        waiting_stub = tei_pb2_grpc.EmbedStub(stack.enter_context(grpc.insecure_channel(waiting)))
        p50 = latency_p50(
            {
                "torch": lambda: engines["torch"].embed([LATENCY_TEXT]),
                "onnx": lambda: engines["onnx"].embed([LATENCY_TEXT]),
                "plain": lambda: plain.embed([LATENCY_TEXT], 1),
                "server": lambda: stub.Embed(tei_pb2.EmbedRequest(inputs=LATENCY_TEXT)),
                "bare": lambda: bare_stub.Embed(tei_pb2.EmbedRequest(inputs=LATENCY_TEXT)),
                "waiting": lambda: waiting_stub.Embed(tei_pb2.EmbedRequest(inputs=LATENCY_TEXT)),
                # The floor of the hop: a call the server answers without the model.
                "info": lambda: info.Info(tei_pb2.InfoRequest()),
            },
            args.latency_samples,
        )
        rss["onnx after the run"] = psutil.Process(server.proc.pid).memory_info().rss / 2**20

    report = render(args, threads, tokens, rates, p50, rss, wait)
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


def warmed_up_rss(server: LocalTEI, texts: list[str]) -> float:
    """MiB resident once the server has answered a few hundred calls."""
    asyncio.run(concurrent(server.address, texts[:256], 32))
    return float(psutil.Process(server.proc.pid).memory_info().rss / 2**20)


def in_process(model: Any, texts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    model.embed(texts, batch_size=batch_size)
    return len(texts) / (time.perf_counter() - started)


async def concurrent(address: str, texts: list[str], clients: int) -> float:
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


def arrow_caller(channel: grpc.Channel, texts: list[str]) -> Callable[[], float]:
    """One EmbedArrow call with every text, through the multiplexer: texts/s."""
    stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
    request = mux.EmbedArrowRequest(
        target=mux.Target(instance_name=INSTANCE), arrow_ipc=text_batch(texts), normalize=True
    )

    def call() -> float:
        started = time.perf_counter()
        reply = stub.EmbedArrow(request, timeout=600)
        rows = pa.ipc.open_stream(pa.py_buffer(reply.arrow_ipc)).read_all().num_rows
        elapsed = time.perf_counter() - started
        assert rows == len(texts)
        return len(texts) / elapsed

    return call


class PlainOnnx:
    """ONNX Runtime as a user would run it in-process: the model's ONNX file (the one
    localtei runs), `InferenceSession` with default options, the fast tokenizer, mean
    pooling and normalizing in numpy."""

    def __init__(self, path: str, tokenizer: Any) -> None:
        import onnxruntime

        self.path = path
        self.session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.tokenizer = tokenizer
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name

    @classmethod
    def of(cls, model: Any) -> PlainOnnx:
        """On the file and tokenizer (no padding, no truncation) of localtei's engine."""
        return cls(model.engine._session._model_path, model.tokenizer._plain)

    @classmethod
    def from_files(cls, path: str, tokenizer_file: str) -> PlainOnnx:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_file)
        tokenizer.no_padding()  # MiniLM's file pads every input to 128 tokens, for training
        return cls(path, tokenizer)

    @functools.cached_property
    def narrow(self) -> Any:
        """The single-threaded session the server's runners use side by side under load."""
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        return onnxruntime.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])

    def embed(self, texts: list[str], batch_size: int, session: Any = None) -> list[Any]:
        import numpy as np

        vectors = []
        for i in range(0, len(texts), batch_size):
            encodings = self.tokenizer.encode_batch(texts[i : i + batch_size])
            width = max(len(e.ids) for e in encodings)
            ids = np.zeros((len(encodings), width), dtype=np.int64)
            mask = np.zeros_like(ids)
            for row, encoding in enumerate(encodings):
                ids[row, : len(encoding.ids)] = encoding.ids
                mask[row, : len(encoding.ids)] = 1
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            feed = {name: value for name, value in feed.items() if name in self.inputs}
            (hidden,) = (session or self.session).run([self.output], feed)
            pooled = (hidden * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
            vectors.extend(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
        return vectors

    def rate(self, texts: list[str], batch_size: int) -> float:
        started = time.perf_counter()
        self.embed(texts, batch_size)
        return len(texts) / (time.perf_counter() - started)

    def side_by_side_rate(self, texts: list[str], batch_size: int) -> float:
        """One thread per core, each embedding its share of batches on the 1-thread session."""
        batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
        started = time.perf_counter()
        with ThreadPoolExecutor(core_count()) as pool:
            list(pool.map(lambda batch: self.embed(batch, batch_size, self.narrow), batches))
        return len(texts) / (time.perf_counter() - started)


def latency_p50(calls: dict[str, Callable[[], object]], samples: int) -> dict[str, float]:
    """Median seconds per call of each. Sides take turns in blocks of 10 calls, with a pause
    before each block: threads one side leaves spinning (torch's OpenMP, ONNX Runtime at
    its defaults) would otherwise slow the side after it."""
    for call in calls.values():
        for _ in range(10):
            call()
    timings: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(max(1, samples // 10)):
        for name, call in calls.items():
            time.sleep(0.05)
            for _ in range(10):
                started = time.perf_counter()
                call()
                timings[name].append(time.perf_counter() - started)
    return {name: statistics.median(spent) for name, spent in timings.items()}


EmbedCall = Callable[[str], Any]


def model_call(onnx_file: str, tokenizer_file: str) -> EmbedCall:
    """The in-process row's own one-text call (`PlainOnnx`): tokenize, run the ONNX file at
    ONNX Runtime's defaults, mean-pool, normalize."""
    plain = PlainOnnx.from_files(onnx_file, tokenizer_file)
    return lambda text: plain.embed([text], 1)[0]


def waiting_call(seconds: float, size: int) -> EmbedCall:
    """No model at all: wait as long as the model call takes, answer a zero vector of the
    model's size."""
    import numpy as np

    answer = np.zeros(size, dtype=np.float32)

    def embed(text: str) -> Any:
        time.sleep(seconds)
        return answer

    return embed


async def serve_bare(port: int, embed: EmbedCall, worker: bool = False) -> None:
    """A bare grpc.aio Embed servicer that runs `embed` inline on its event loop (or, with
    `worker`, on one worker thread): no batcher, no metrics, no validation."""
    pool = ThreadPoolExecutor(1)

    class Bare(tei_pb2_grpc.EmbedServicer):
        async def Embed(self, request: Any, context: Any) -> tei_pb2.EmbedResponse:
            if worker:
                loop = asyncio.get_running_loop()
                vector = await loop.run_in_executor(pool, embed, request.inputs)
            else:
                vector = embed(request.inputs)
            return tei_pb2.EmbedResponse(embeddings=vector)

    server = grpc.aio.server()
    tei_pb2_grpc.add_EmbedServicer_to_server(Bare(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


@contextmanager
def bare_server(*command: str) -> Iterator[str]:
    """`serve_bare` in its own process: `bare-server ONNX_FILE TOKENIZER_JSON` (the same ONNX
    file as the in-process rows) or `waiting-server SECONDS SIZE`."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, __file__, command[0], str(port), *command[1:]], cwd=ROOT
    )
    address = f"127.0.0.1:{port}"
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        yield address
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def multiplexer_for(server: LocalTEI) -> Iterator[str]:
    """`manage.py runmultiplexer` on a scratch database whose one instance is `server`."""
    call_command("migrate", verbosity=0)
    from instances.models import Instance

    Instance.objects.create(
        name=INSTANCE,
        model_id=MINILM_ID,
        port=server.port,
        prometheus_port=server.prometheus_port,
        status="running",
        node="bench",
    )
    port = free_port()
    log = (SCRATCH / "multiplexer.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "manage.py", "runmultiplexer", "--host", "127.0.0.1", "--port",
         str(port), "--metrics-port", str(free_port())],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'proto'}"},
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    try:
        wait_until_serving(address, process)
        yield address
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def wait_until_serving(address: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the multiplexer exited; see {SCRATCH / 'multiplexer.log'}")
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit("the multiplexer did not start within 60 s")


def render(
    args: argparse.Namespace,
    threads: dict[str, int],
    tokens: float,
    rates: dict[str, list[float]],
    p50: dict[str, float],
    rss: dict[str, float],
    wait: float,
) -> str:
    rate = {name: statistics.median(values) for name, values in rates.items()}
    fastest = max(BASELINES, key=lambda name: rate[name])
    quickest = min(BASELINES, key=lambda name: p50[name])

    def per_round(name: str, against: str) -> str:
        ratios = [a / b for a, b in zip(rates[name], rates[against], strict=True)]
        return ", ".join(f"{ratio:.2f}" for ratio in ratios)

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def row(name: str, label: str, goal: str = "") -> str:
        latency = (
            f"{p50[name] * 1000:.2f} ms | {p50[name] / p50[quickest]:.2f}" if name in p50 else " | "
        )
        return (
            f"| {label} | {rate[name]:.0f} | {rate[name] / rate[fastest]:.2f} "
            f"| {latency} | {goal} |"
        )

    server_ratio = rate["server"] / rate[fastest]
    arrow_ratio = rate["arrow"] / rate[fastest]
    latency_ratio = p50["server"] / p50[quickest]
    command = "python benchmarks/localtei_throughput.py " + " ".join(
        f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()
    )
    batch, half = args.batch_size, args.batch_size // 2
    return "\n".join(
        [
            "# localtei throughput",
            "",
            f"Model `{MINILM_ID}`, {args.texts} texts of about {tokens:.0f} tokens, "
            f"{core_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"intra-op threads: torch {threads['torch']}, ONNX Runtime {threads['onnx']}, "
            f"server at its defaults; {time.strftime('%Y-%m-%d %H:%M')}. Command: `{command}`.",
            "",
            "| measure | texts/s | / fastest in-process | one text, p50 | / quickest in-process "
            "| goal |",
            "|---|---:|---:|---:|---:|---|",
            row("torch", f"in-process torch (localtei's engine), batch {batch}"),
            row("onnx", f"in-process ONNX Runtime (localtei's engine), batch {batch}"),
            row("plain", f"in-process ONNX Runtime at its defaults, same file, batch {batch}"),
            row(
                "server",
                f"localtei server, {args.clients} concurrent unary Embed",
                f"throughput {server_ratio:.3f} >= 0.90: {verdict(server_ratio >= 0.9)}; "
                f"p50 {latency_ratio:.3f} <= 1.3: {verdict(latency_ratio <= 1.3)}",
            ),
            row(
                "arrow",
                f"EmbedArrow, {args.texts} texts in one call, through the multiplexer",
                f">= 0.85: {verdict(arrow_ratio >= 0.85)}",
            ),
            row(
                "side_by_side",
                f"for reference: in-process ONNX Runtime, one 1-thread run per core side by "
                f"side, batch {half} each (the server's layout under load)",
                f"server / this: {rate['server'] / rate['side_by_side']:.2f}",
            ),
            f"| the server's gRPC hop alone: unary Info, p50 | | | {p50['info'] * 1000:.2f} ms "
            "| | – (what a Python gRPC server costs a call before any model work) |",
            f"| for reference: a bare Python gRPC Embed server (grpc.aio on uvloop, the same "
            f"ONNX file run inline on its event loop: no batcher, no worker threads, no "
            f"metrics), p50 "
            f"| | | {p50['bare'] * 1000:.2f} ms "
            f"| {p50['bare'] / p50[quickest]:.2f} | the floor under the server's p50 here; "
            f"server / this: {p50['server'] / p50['bare']:.2f} |",
            f"| for reference: a bare Python gRPC Embed server with no model, whose call only "
            f"waits {wait * 1000:.2f} ms (the in-process call's p50, measured just before) and "
            f"answers a zero vector, p50 | | | {p50['waiting'] * 1000:.2f} ms "
            f"| | gRPC's own cost around a call this long: "
            f"{(p50['waiting'] - wait) * 1000:.2f} ms, "
            f"{(p50['waiting'] - wait) / p50[quickest] * 100:.0f} % of the quickest in-process "
            f"call (the goal leaves 30 %) |",
            "",
            f"Fastest in-process engine (of the first three rows): {NAMES[fastest]}; quickest "
            f"for one text: {NAMES[quickest]}. Medians over {args.rounds} rounds (each round "
            "runs every side once, in rotating order); per round, server / fastest: "
            f"{per_round('server', fastest)}; EmbedArrow / fastest: "
            f"{per_round('arrow', fastest)}. One-text p50 over {args.latency_samples} calls "
            "of each, in blocks of 10 per side. Load average at the end: "
            f"{os.getloadavg()[0]:.1f} (other work on the machine slows every side).",
            "",
            f"Server RSS after warm-up (256 calls): `--backend torch` {rss['torch']:.0f} MiB, "
            f"ONNX Runtime (the default) {rss['onnx']:.0f} MiB "
            f"({rss['onnx after the run']:.0f} MiB after the run).",
            "",
        ]
    )


if __name__ == "__main__":
    main()
