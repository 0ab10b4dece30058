"""localtei's engines: ONNX Runtime answers as torch does for every model type, the ONNX
export is made once per model and written atomically, the backend and dtype flags, memory,
and the batcher's workers.

In-process models run with one intra-op thread; servers with the suite's environment
(LOCALTEI_NUM_THREADS=1, the session's LOCALTEI_CACHE).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from tei.v1 import tei_pb2, tei_pb2_grpc

from localtei import onnx_export
from localtei.batching import Batcher
from localtei.cli import parse_args
from localtei.errors import ValidationError
from localtei.jobs import Job, Task
from localtei.model import Model, load_model
from localtei.onnx_export import ExportError, cached_export, head_of
from localtei.services import packed_floats
from localtei.settings import default_cache_dir
from localtei.spec import describe_model
from localtei.tokenization import Encoded, TextInput
from tests.localtei_fixtures import (
    MINILM_ID,
    REPO_ROOT,
    TinyModels,
    build_tiny_model,
    build_tiny_models,
    free_port,
    launch_localtei,
    localtei_env,
    start_localtei,
)

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors, and two engines must agree on every one of them.",
    "A completely different sentence about cooking pasta.",
]
PAIRS = [("what is tei", "an embedding server"), ("x", "a much longer second text here")]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


def cosines(a: Any, b: Any) -> list[float]:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def both(model_id: str | Path, pooling: str | None = None) -> tuple[Model, Model]:
    loaded = [
        load_model(str(model_id), pooling, backend=backend, threads=1)
        for backend in ("onnx", "torch")
    ]
    assert [model.backend for model in loaded] == ["onnx", "torch"]
    return loaded[0], loaded[1]


def run(model: Model, task: Task, inputs: list[TextInput]) -> list[Any]:
    jobs = []
    for encoded in model.tokenizer.encode_many(inputs):
        assert isinstance(encoded, Encoded)
        jobs.append(Job(encoded, task, normalize=False, raw_scores=True))
    return model.run(jobs)


# Same numbers ---------------------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["mean", "cls", "last-token"])
def test_onnx_and_torch_give_the_same_vectors_for_every_pooling(pooling: str) -> None:
    onnx, torch = both(MINILM_ID, pooling)
    inputs = [TextInput(text) for text in TEXTS]  # different lengths: padded rows
    assert min(cosines(run(onnx, Task.POOLED, inputs), run(torch, Task.POOLED, inputs))) >= 0.9999


def test_onnx_and_torch_give_the_same_vector_for_every_token() -> None:
    onnx, torch = both(MINILM_ID)
    inputs = [TextInput(text) for text in TEXTS]
    for got, expected in zip(
        run(onnx, Task.ALL, inputs), run(torch, Task.ALL, inputs), strict=True
    ):
        assert np.shape(got) == np.shape(expected)
        assert min(cosines(got, expected)) >= 0.9999


def test_onnx_and_torch_give_the_same_splade_vectors(models: TinyModels) -> None:
    onnx, torch = both(models.splade, "splade")
    inputs = [TextInput(text) for text in TEXTS]
    got, expected = run(onnx, Task.POOLED, inputs), run(torch, Task.POOLED, inputs)
    assert np.shape(got) == (len(TEXTS), 30522)
    assert min(cosines(got, expected)) >= 0.9999


def test_onnx_and_torch_give_the_same_classifier_and_reranker_scores(models: TinyModels) -> None:
    inputs = [TextInput(text) for text in TEXTS] + [TextInput(q, p) for q, p in PAIRS]
    onnx, torch = both(models.classifier)
    assert min(cosines(run(onnx, Task.SCORES, inputs), run(torch, Task.SCORES, inputs))) >= 0.9999
    onnx, torch = both(models.reranker)
    got, expected = run(onnx, Task.SCORES, inputs), run(torch, Task.SCORES, inputs)
    # One score per row: compare the column of scores, and each score.
    assert min(cosines([np.ravel(got)], [np.ravel(expected)])) >= 0.9999
    assert np.allclose(got, expected, atol=1e-4)


def test_the_models_own_onnx_file_is_used_without_an_export(
    models: TinyModels, tmp_path: Path
) -> None:
    spec = describe_model(models.classifier)
    exported = cached_export(spec, head_of(spec), default_cache_dir())
    shipped = tmp_path / "with-onnx"
    shutil.copytree(models.classifier, shipped)
    (shipped / "onnx").mkdir()
    shutil.copy(exported, shipped / "onnx" / "model.onnx")
    empty_cache = tmp_path / "cache"
    model = load_model(str(shipped), backend="onnx", threads=1, onnx_cache=empty_cache)
    assert not empty_cache.exists()  # nothing exported, nothing cached
    inputs = [TextInput(text) for text in TEXTS]
    torch = load_model(str(models.classifier), backend="torch", threads=1)
    assert min(cosines(run(model, Task.SCORES, inputs), run(torch, Task.SCORES, inputs))) >= 0.9999


def test_int8_is_quantized_only_when_asked_and_stays_close() -> None:
    float32 = load_model(MINILM_ID, backend="onnx", threads=1)
    int8 = load_model(MINILM_ID, "mean", "int8", threads=1)
    assert (float32.dtype, int8.dtype, int8.backend) == ("float32", "int8", "onnx")
    assert min(cosines(int8.embed(TEXTS), float32.embed(TEXTS))) >= 0.97


def test_a_batch_beside_others_gets_the_numbers_of_a_batch_alone() -> None:
    model = load_model(MINILM_ID, backend="onnx", threads=2, runners=2)
    assert model.engine.runners == 2
    inputs = [TextInput(text) for text in TEXTS]
    jobs = [Job(e, Task.POOLED) for e in model.tokenizer.encode_many(inputs)]  # type: ignore[arg-type]
    alone, beside = model.run(jobs, alone=True), model.run(jobs, alone=False)
    assert min(cosines(alone, beside)) >= 0.99999


@pytest.mark.parametrize(
    ("threads", "weight_bytes", "configured", "expected"),
    [
        (2, 90 * 2**20, None, 2),  # a small model: one batch per thread
        (4, 90 * 2**20, None, 4),
        (1, 90 * 2**20, None, 1),  # one thread: nothing to run side by side
        (2, 400 * 2**20, None, 1),  # two copies of a big model would outgrow torch: TEI's way
        (2, 400 * 2**20, 2, 2),  # LOCALTEI_RUNNERS wins...
        (2, 90 * 2**20, 8, 2),  # ...up to the thread count
    ],
)
def test_how_many_batches_run_at_once(
    threads: int, weight_bytes: int, configured: int | None, expected: int
) -> None:
    from localtei.onnx_engine import runners_for

    assert runners_for(threads, weight_bytes, configured) == expected


@pytest.mark.parametrize("name", ["LOCALTEI_RUNNERS", "LOCALTEI_NUM_THREADS"])
def test_a_bad_count_in_the_environment_fails_the_start_with_one_line(
    name: str, tmp_path: Path
) -> None:
    env = localtei_env(**{name: "two"})
    server = launch_localtei(MINILM_ID, env=env, log_path=tmp_path / "log", prepare=False)
    assert server.proc.wait(120) == 1
    log = (tmp_path / "log").read_text()
    assert f"{name} must be a whole number >= 1, not 'two'" in log
    assert "Traceback" not in log


def test_an_embed_answer_built_from_bytes_is_the_same_message() -> None:
    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    built = tei_pb2.EmbedResponse.FromString(packed_floats(vector))
    assert built == tei_pb2.EmbedResponse(embeddings=vector.tolist())
    assert tei_pb2.EmbedResponse.FromString(packed_floats(vector[:3])).embeddings == pytest.approx(
        vector[:3].tolist()
    )


# The export cache -----------------------------------------------------------------------


def test_a_cached_file_appears_whole_or_not_at_all(tmp_path: Path) -> None:
    final = tmp_path / "key"

    def make(scratch: Path) -> None:
        (scratch / "model.onnx").write_bytes(b"half")
        assert not final.exists()  # a reader sees nothing while it is written
        with (scratch / "model.onnx").open("ab") as handle:
            handle.write(b" and the rest")

    path = onnx_export._cached(tmp_path, "key", make, "Writing")
    assert path == final / "model.onnx" and path.read_bytes() == b"half and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key", "key.lock"]


def test_callers_wanting_the_same_file_at_once_make_it_once(tmp_path: Path) -> None:
    made: list[str] = []
    started = threading.Event()

    def make(scratch: Path) -> None:
        made.append(threading.current_thread().name)
        started.set()
        time.sleep(0.5)  # the other caller arrives meanwhile and must wait
        (scratch / "model.onnx").write_bytes(b"onnx")

    paths: list[Path] = []

    def call() -> None:
        paths.append(onnx_export._cached(tmp_path, "key", make, "Writing"))

    first = threading.Thread(target=call)
    first.start()
    assert started.wait(10)
    second = threading.Thread(target=call)
    second.start()
    first.join(30)
    second.join(30)
    assert len(made) == 1 and paths == [tmp_path / "key" / "model.onnx"] * 2


def test_a_scratch_folder_left_by_a_killed_export_is_cleared(tmp_path: Path) -> None:
    (tmp_path / ".tmp-key-left").mkdir()
    (tmp_path / ".tmp-key-left" / "model.onnx").write_bytes(b"half")

    def make(scratch: Path) -> None:
        (scratch / "model.onnx").write_bytes(b"onnx")

    onnx_export._cached(tmp_path, "key", make, "Writing")
    assert not (tmp_path / ".tmp-key-left").exists()


def test_an_unwritable_cache_is_an_export_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ExportError, match="cannot write to the ONNX cache"):
        onnx_export._cached(tmp_path / "a-file" / "cache", "key", lambda _: None, "Writing")


def test_two_processes_exporting_at_once_both_end_with_one_good_file(tmp_path: Path) -> None:
    model = build_tiny_model("reranker", tmp_path / "reranker", seed=7)
    cache = tmp_path / "cache"
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "from localtei.model import load_model\n"
        f"model = load_model({str(model)!r}, backend='onnx', threads=1,"
        f" onnx_cache={str(cache)!r})\n"
        "print('loaded', model.backend)\n"
    )
    env = localtei_env()
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert all("loaded onnx" in output for output in outputs)
    assert sum(output.count("Exporting the model to ONNX (once") for output in outputs) == 1
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]  # one folder, no scratch left
    assert entry.name.startswith("sequence-classification-")
    assert [p.name for p in entry.iterdir()] == ["model.onnx"]
    reloaded = load_model(str(model), backend="onnx", threads=1, onnx_cache=cache)
    torch = load_model(str(model), backend="torch", threads=1)
    inputs = [TextInput(q, p) for q, p in PAIRS]
    assert np.allclose(
        run(reloaded, Task.SCORES, inputs), run(torch, Task.SCORES, inputs), atol=1e-4
    )


# Flags and start-up ---------------------------------------------------------------------


def test_the_backend_flag_defaults_to_auto_and_falls_back_to_its_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert parse_args([]).backend == "auto"
    monkeypatch.setenv("LOCALTEI_BACKEND", "torch")
    assert parse_args([]).backend == "torch"
    assert parse_args(["--backend", "onnx"]).backend == "onnx"
    assert parse_args(["--dtype", "int8"]).dtype == "int8"
    with pytest.raises(SystemExit):
        parse_args(["--backend", "tensorrt"])


def broken_cache_env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "not-a-folder").write_text("")
    return localtei_env(LOCALTEI_CACHE=str(tmp_path / "not-a-folder" / "cache"))


def run_localtei(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localtei", "--port", str(free_port()), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_backend_onnx_exits_with_one_clear_line_when_no_onnx_file_can_be_made(
    models: TinyModels, tmp_path: Path
) -> None:
    result = run_localtei(
        "--model-id", str(models.reranker), "--backend", "onnx", env=broken_cache_env(tmp_path)
    )
    assert result.returncode == 1
    (error,) = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert (
        "ONNX Runtime cannot run the model" in error and "cannot write to the ONNX cache" in error
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dtype", "int8", "--backend", "torch"), "`--dtype int8`"),
        (("--dtype", "float16"), "`--dtype float16` needs a CUDA GPU"),
    ],
)
def test_dtypes_the_device_cannot_run_fail_the_start_with_one_line(
    models: TinyModels, args: tuple[str, ...], message: str
) -> None:
    import torch

    if torch.cuda.is_available() and "float16" in args:
        pytest.skip("float16 is valid where there is a GPU")
    result = run_localtei("--model-id", str(models.reranker), *args, env=localtei_env())
    assert result.returncode == 1
    (error,) = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert message in error


def test_auto_falls_back_to_torch_and_logs_why(models: TinyModels, tmp_path: Path) -> None:
    env = broken_cache_env(tmp_path)
    with start_localtei(models.reranker, env=env, log_path=tmp_path / "log") as server:
        with server.channel() as channel:
            info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())
            ranked = tei_pb2_grpc.RerankStub(channel).Rerank(
                tei_pb2.RerankRequest(query="q", texts=["a", "b"])
            )
        log = server.log_text()
    assert info.model_dtype == "float32" and len(ranked.ranks) == 2
    (warning,) = [line for line in log.splitlines() if "falling back to torch" in line]
    assert "WARN" in warning and "cannot write to the ONNX cache" in warning
    assert "torch on cpu" in log


def test_a_stop_during_the_export_ends_the_export_too(models: TinyModels, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    server = launch_localtei(
        models.splade,
        "--pooling",
        "splade",
        env=localtei_env(LOCALTEI_CACHE=str(cache)),
        log_path=tmp_path / "log",
        prepare=False,  # the server itself is to export
    )
    try:
        deadline = time.monotonic() + 60
        while "Exporting the model" not in server.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Exporting the model" in server.log_text(), server.log_text()
        started = time.monotonic()
        assert server.stop() == 0, server.log_text()
        assert time.monotonic() - started < 10, server.log_text()
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while exporters(cache) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not exporters(cache), server.log_text()
    assert not [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".tmp-")]


def exporters(cache: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(cache) in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


# Servers: int8, memory, and the two backends through gRPC --------------------------------


def embed_all(server: Any, texts: list[str]) -> list[list[float]]:
    with server.channel() as channel:
        stub = tei_pb2_grpc.EmbedStub(channel)
        return [list(stub.Embed(tei_pb2.EmbedRequest(inputs=text)).embeddings) for text in texts]


def info(server: Any) -> Any:
    with server.channel() as channel:
        return tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())


def test_info_says_int8_when_int8_was_asked_for(tmp_path: Path) -> None:
    with start_localtei(MINILM_ID, "--dtype", "int8", log_path=tmp_path / "log") as server:
        assert info(server).model_dtype == "int8"
        assert len(embed_all(server, TEXTS[:1])[0]) == 384


def test_the_onnx_server_answers_as_torch_does_and_uses_no_more_memory(tmp_path: Path) -> None:
    """ONNX on two threads: two sessions (every thread; one thread per concurrent batch),
    its largest layout, still under torch's memory. Calls come 8 at a time, so batches run
    side by side on the one-thread session and alone on the other."""
    texts = [f"Sentence {i} is about topic {i * 7 % 13}, padded to various lengths." * (i % 3 + 1)
             for i in range(64)]  # fmt: skip
    rss, vectors = {}, {}
    for backend in ("torch", "onnx"):
        args = ("--backend", backend)
        env = localtei_env(LOCALTEI_NUM_THREADS="2")
        log_path = tmp_path / f"{backend}.log"
        with start_localtei(MINILM_ID, *args, env=env, log_path=log_path) as server:
            vectors[backend] = embed_concurrently(server, texts)  # also the warm-up
            rss[backend] = psutil.Process(server.proc.pid).memory_info().rss
            assert f"{backend} on cpu" in server.log_text()
    assert "up to 2 batches at once" in (tmp_path / "onnx.log").read_text()
    assert min(cosines(vectors["onnx"], vectors["torch"])) >= 0.9999
    assert rss["onnx"] <= rss["torch"], {name: value / 2**20 for name, value in rss.items()}


def embed_concurrently(server: Any, texts: list[str]) -> list[list[float]]:
    from concurrent.futures import ThreadPoolExecutor

    with server.channel() as channel, ThreadPoolExecutor(8) as callers:
        stub = tei_pb2_grpc.EmbedStub(channel)
        answers = callers.map(lambda text: stub.Embed(tei_pb2.EmbedRequest(inputs=text)), texts)
        return [list(answer.embeddings) for answer in answers]


def test_cuda_runs_torch_in_float16_where_there_is_a_gpu(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gpu = load_model(MINILM_ID)
    assert (gpu.backend, gpu.dtype) == ("torch", "float16") and gpu.device.startswith("cuda")
    cpu = load_model(MINILM_ID, backend="onnx", threads=1)
    assert min(cosines(gpu.embed(TEXTS), cpu.embed(TEXTS))) >= 0.999
    env = {k: v for k, v in localtei_env().items() if k != "CUDA_VISIBLE_DEVICES"}
    with start_localtei(MINILM_ID, env=env, log_path=tmp_path / "log") as server:
        assert info(server).model_dtype == "float16"
        assert "torch on cuda" in server.log_text()


# The batcher's workers ------------------------------------------------------------------


class Recorder:
    """A Batcher's callbacks: what was tokenized where, what was delivered."""

    def __init__(self) -> None:
        self.tokenized_on: list[str] = []
        self.delivered: dict[str, Any] = {}
        self.done = threading.Condition()
        self.running = threading.Event()
        self.release = threading.Event()
        self.second_tokenized = threading.Event()
        self.alone: dict[str, bool] = {}  # first text of each batch: did it run alone?
        self.concurrent = 0
        self.most_at_once = 0

    def tokenize(self, inputs: Any) -> list[Any]:
        self.tokenized_on.append(threading.current_thread().name)
        if any(item.text == "second" for item in inputs):
            self.second_tokenized.set()
        return [
            ValidationError("too long") if item.text == "bad" else Encoded([1, 2, 3], [0] * 3, 3)
            for item in inputs
        ]

    def run_batch(self, jobs: Any, alone: bool) -> list[Any]:
        with self.done:
            self.alone[jobs[0].source.text] = alone
            self.concurrent += 1
            self.most_at_once = max(self.most_at_once, self.concurrent)
        self.running.set()
        try:
            assert self.release.wait(30)
        finally:
            with self.done:
                self.concurrent -= 1
        return [job.source.text for job in jobs]

    def deliver(self, jobs: list[Job], results: Any) -> None:
        with self.done:
            for index, job in enumerate(jobs):
                assert job.source is not None
                self.delivered[job.source.text] = results[index]
            self.done.notify_all()

    def wait_for(self, count: int) -> None:
        with self.done:
            assert self.done.wait_for(lambda: len(self.delivered) >= count, 30)


def text_job(text: str) -> Job:
    return Job(None, Task.POOLED, source=TextInput(text))


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, Batcher]]:
    recorder = Recorder()
    batcher = Batcher(
        recorder.run_batch,
        recorder.deliver,
        1000,
        tokenize=recorder.tokenize,
        tokenization_workers=2,
    )
    yield recorder, batcher
    recorder.release.set()
    batcher.stop()


def test_the_next_batch_is_tokenized_on_a_worker_while_one_runs(
    recorder: tuple[Recorder, Batcher],
) -> None:
    calls, batcher = recorder
    batcher.submit([text_job("first")])
    assert calls.running.wait(30)  # the model is busy with "first"...
    batcher.submit([text_job("second")])
    assert calls.second_tokenized.wait(30)  # ...and "second" is tokenized meanwhile
    calls.release.set()
    calls.wait_for(2)
    assert calls.delivered == {"first": "first", "second": "second"}
    assert all(name.startswith("localtei-worker") for name in calls.tokenized_on)


def test_with_two_runners_a_batch_starts_while_another_runs_and_each_knows_it() -> None:
    calls = Recorder()
    batcher = Batcher(calls.run_batch, calls.deliver, 1000, tokenize=calls.tokenize, runners=2)
    try:
        batcher.submit([text_job("first")])
        assert calls.running.wait(30)  # "first" holds one runner until released...
        batcher.submit([text_job("second")])
        with calls.done:  # ...and "second" starts on the other meanwhile
            assert calls.done.wait_for(lambda: "second" in calls.alone, 30)
        batcher.submit([text_job("third")])  # both runners busy: it waits in the queue
        time.sleep(0.2)
        assert "third" not in calls.alone
        calls.release.set()
        calls.wait_for(3)
        assert calls.delivered == {"first": "first", "second": "second", "third": "third"}
        assert calls.most_at_once == 2
        # The engine gives a batch every core only when it runs with no other one.
        assert calls.alone["first"] is True and calls.alone["second"] is False
    finally:
        calls.release.set()
        batcher.stop()


def test_one_runner_runs_one_batch_at_a_time(recorder: tuple[Recorder, Batcher]) -> None:
    calls, batcher = recorder
    batcher.submit([text_job("first")])
    assert calls.running.wait(30)
    batcher.submit([text_job("second")])
    assert calls.second_tokenized.wait(30)
    time.sleep(0.2)
    assert "second" not in calls.alone  # queued behind "first", not started beside it
    calls.release.set()
    calls.wait_for(2)
    assert calls.most_at_once == 1 and calls.alone == {"first": True, "second": True}


def test_a_refused_input_fails_alone(recorder: tuple[Recorder, Batcher]) -> None:
    calls, batcher = recorder
    calls.release.set()
    batcher.submit([text_job("bad"), text_job("good")])
    calls.wait_for(2)
    assert isinstance(calls.delivered["bad"], ValidationError)
    assert calls.delivered["good"] == "good"
