"""Load a model on an engine (ONNX Runtime or torch) and run batches of tokenized inputs.

`load_model()` is also the in-process API (see the package docstring): the server and a
benchmark baseline share this exact code path. The engine does the forward pass and the
pooling; everything before (padding) and after (normalizing, sparse entries, scores) is
shared, so both engines answer alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from localtei.errors import BackendError, StartupError
from localtei.jobs import Job, Task
from localtei.lookup import ModelLocation, find_model
from localtei.settings import (
    BACKENDS,
    configured_runners,
    default_cache_dir,
    default_num_threads,
)
from localtei.spec import ModelKind, ModelSpec, describe_model
from localtei.tokenization import TextInput, TextTokenizer

__all__ = ["Engine", "Model", "default_num_threads", "load_model"]

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16", "int8")


class Engine(Protocol):
    """A forward pass plus pooling, on numpy arrays in and out."""

    name: str  # "onnx" or "torch"
    device: str
    dtype: str  # what Info's model_dtype says
    threads: int
    runners: int  # batches that may run at once
    # Padded tokens per forward pass beyond which it runs no faster, if there is such a limit.
    batch_tokens: int | None

    def forward(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        types: np.ndarray,
        *,
        hidden: bool,
        pooled: bool,
        alone: bool = True,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(token vectors (batch, tokens, size) if `hidden`, pooled vectors if `pooled`).

        For classifiers and rerankers `pooled` is the logits (batch, labels); for SPLADE
        the pooled vocabulary-sized vectors. `alone`: no other batch runs meanwhile.
        """
        ...


def load_model(
    model_id: str,
    pooling: str | None = None,
    dtype: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    backend: str = "auto",
    threads: int | None = None,
    runners: int | None = None,
    onnx_cache: str | Path | None = None,
    default_prompt: str | None = None,
    default_prompt_name: str | None = None,
    max_input_length: int | None = None,
    found: tuple[ModelLocation, ModelSpec] | None = None,
) -> Model:
    """Find, describe and load a model; StartupError with one clear line when impossible.

    `backend`: "onnx" (ONNX Runtime on CPU), "torch", or "auto": ONNX Runtime on CPU and
    torch on CUDA, torch when ONNX Runtime cannot run the model (logged). `dtype` "int8"
    is ONNX Runtime's dynamic quantization, only when asked. `threads`: intra-op threads
    (default LOCALTEI_NUM_THREADS, else every core). `runners`: batches ONNX Runtime may
    run at once (default LOCALTEI_RUNNERS, else see localtei.onnx_engine). `onnx_cache`:
    where exported ONNX files are kept (default LOCALTEI_CACHE, else a folder under the
    Hugging Face cache).
    `max_input_length` caps the model's own limit (the server passes `--max-batch-tokens`).
    `found`: where the model is and what it is, when the caller has looked already.
    """
    if backend not in BACKENDS:
        raise StartupError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if dtype is not None and dtype not in DTYPES:
        raise StartupError(f"unknown dtype {dtype!r} (one of {', '.join(DTYPES)})")
    if found is None:
        location = find_model(model_id, revision, cache_dir)
        found = location, describe_model(location.path, pooling, model_id)
    location, spec = found
    if default_prompt_name is not None:
        if default_prompt_name not in spec.prompts:
            raise StartupError(
                f"`--default-prompt-name {default_prompt_name}` is not among the model's "
                f"prompts ({', '.join(sorted(spec.prompts)) or 'none'})"
            )
        default_prompt = spec.prompts[default_prompt_name]
    limit = spec.max_input_length
    if max_input_length is not None and max_input_length < limit:
        log.warning(
            "inputs are limited to %d tokens (the model allows %d)", max_input_length, limit
        )
        limit = max_input_length
    tokenizer = TextTokenizer.from_model_dir(location.path, limit, spec.prompts, default_prompt)
    threads = threads or default_num_threads()
    runners = runners or configured_runners()
    cache = Path(onnx_cache) if onnx_cache is not None else default_cache_dir()
    engine = _load_engine(spec, backend, device, dtype, threads, runners, cache)
    return Model(model_id, spec, engine, tokenizer, location.sha)


def _load_engine(
    spec: ModelSpec,
    backend: str,
    device: str | None,
    dtype: str | None,
    threads: int,
    runners: int | None,
    cache: Path,
) -> Engine:
    device = device or ("cuda" if backend != "onnx" and _cuda_available() else "cpu")
    on_cuda = device.startswith("cuda")
    if dtype == "float16" and not on_cuda:
        raise StartupError("`--dtype float16` needs a CUDA GPU; on CPU use float32 (or int8)")
    if dtype == "int8" and (on_cuda or backend == "torch"):
        raise StartupError("`--dtype int8` is ONNX Runtime's quantization: CPU and onnx only")
    if backend == "onnx" and (on_cuda or dtype == "bfloat16"):
        what = "a CUDA device" if on_cuda else "bfloat16"
        raise StartupError(f"`--backend onnx` runs float32 or int8 on CPU, not {what}")
    use_onnx = backend == "onnx" or (backend == "auto" and not on_cuda and dtype != "bfloat16")
    if use_onnx:
        from localtei.onnx_engine import OnnxUnavailable, load_onnx_engine

        try:
            return load_onnx_engine(spec, dtype or "float32", threads, cache, runners)
        except OnnxUnavailable as exc:
            if backend == "onnx" or dtype == "int8":
                raise StartupError(f"ONNX Runtime cannot run the model: {exc}") from exc
            log.warning("ONNX Runtime cannot run the model (%s): falling back to torch", exc)
    from localtei.torch_engine import load_torch_engine

    return load_torch_engine(spec, dtype, device, threads)


def _cuda_available() -> bool:
    # Without an NVIDIA driver there is no CUDA device: skip importing torch to find out.
    if not Path("/proc/driver/nvidia").exists() and not Path("/dev/nvidiactl").exists():
        return False
    import torch

    return bool(torch.cuda.is_available())


class Model:
    """A loaded model: `run()` does one padded forward pass for a batch of jobs."""

    def __init__(
        self,
        model_id: str,
        spec: ModelSpec,
        engine: Engine,
        tokenizer: TextTokenizer,
        sha: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.spec = spec
        self.engine = engine
        self.tokenizer = tokenizer
        self.sha = sha
        self.pad_id = spec.pad_token_id
        self.vocab_size = spec.vocab_size

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def device(self) -> str:
        return self.engine.device

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def output_size(self) -> int:
        """Length of a pooled vector: the hidden size, or the vocabulary for SPLADE."""
        return self.vocab_size if self.spec.is_splade else self.spec.hidden_size

    def check(self, task: Task, normalize: bool = False) -> None:
        """BackendError when this model cannot do `task` (TEI answers FAILED_PRECONDITION)."""
        kind, splade = self.spec.kind, self.spec.is_splade
        if task is Task.SCORES:
            if kind is ModelKind.EMBEDDING:
                raise BackendError("model is not a classifier model")
            return
        if kind is not ModelKind.EMBEDDING:
            raise BackendError(f"model is not an embedding model (model type: {kind.value})")
        if task is Task.SPARSE and not splade:
            raise BackendError("model is not an embedding model with SPLADE pooling")
        if task is Task.ALL and splade:
            raise BackendError("`embed_all` is not available for SPLADE models")
        if task is Task.POOLED and splade and normalize:
            raise BackendError("`normalize` is not available for SPLADE models")

    def run(self, jobs: Sequence[Job], alone: bool = True) -> list[Any]:
        """Results in job order: a vector (float32 array), (indices, values), token
        vectors, or scores. `alone`: no other batch runs meanwhile (see Batcher)."""
        start = time.perf_counter_ns()
        lengths = [job.tokens for job in jobs]
        ids, mask, types = self._inputs(jobs, lengths)
        tasks = {job.task for job in jobs}
        hidden, pooled = self.engine.forward(
            ids, mask, types, hidden=Task.ALL in tasks, pooled=bool(tasks - {Task.ALL}), alone=alone
        )
        results = self._results(jobs, lengths, hidden, pooled)
        elapsed = time.perf_counter_ns() - start
        for job in jobs:
            job.inference_ns = elapsed
        return results

    def embed(
        self, texts: Sequence[str], normalize: bool = True, batch_size: int = 32
    ) -> np.ndarray:
        """Pooled embeddings of `texts` (truncated to the model's limit), shape (n, size)."""
        self.check(Task.POOLED, normalize)
        vectors: list[np.ndarray] = []
        for i in range(0, len(texts), batch_size):
            inputs = [TextInput(text, truncate=True) for text in texts[i : i + batch_size]]
            jobs = []
            for encoded in self.tokenizer.encode_many(inputs):
                if isinstance(encoded, Exception):
                    raise encoded
                jobs.append(Job(encoded, Task.POOLED, normalize))
            vectors.extend(self.run(jobs))
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.output_size)

    def warm_up(self) -> None:
        """Forward passes, so the first request does not pay for lazy initialisation."""
        task = Task.POOLED if self.spec.kind is ModelKind.EMBEDDING else Task.SCORES
        encoded = self.tokenizer.encode("Warming up the model.")
        self.run([Job(encoded, task, normalize=False)])
        self.run([Job(encoded, task, normalize=False) for _ in range(4)])

    def _inputs(
        self, jobs: Sequence[Job], lengths: list[int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        width = max(lengths)
        ids = np.full((len(jobs), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(jobs), width), dtype=np.int64)
        mask = np.zeros((len(jobs), width), dtype=np.int64)
        for row, (job, length) in enumerate(zip(jobs, lengths, strict=True)):
            assert job.encoded is not None
            ids[row, :length] = job.encoded.ids
            types[row, :length] = job.encoded.type_ids
            mask[row, :length] = 1
        return ids, mask, types

    def _results(
        self,
        jobs: Sequence[Job],
        lengths: list[int],
        hidden: np.ndarray | None,
        pooled: np.ndarray | None,
    ) -> list[Any]:
        if self.spec.kind is not ModelKind.EMBEDDING:
            assert pooled is not None
            return [_scores(row, job.raw_scores) for row, job in zip(pooled, jobs, strict=True)]
        results: list[Any] = []
        for row, (job, length) in enumerate(zip(jobs, lengths, strict=True)):
            if job.task is Task.ALL:
                assert hidden is not None
                results.append(hidden[row, :length].tolist())
                continue
            assert pooled is not None
            if job.task is Task.SPARSE:
                (indices,) = np.nonzero(pooled[row])
                results.append((indices.tolist(), pooled[row, indices].tolist()))
            else:
                results.append(_dense(pooled[row], job.normalize, job.dimensions))
        return results


def _dense(vector: np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector.astype(np.float32, copy=False)


def _scores(logits: np.ndarray, raw_scores: bool) -> list[float]:
    if raw_scores:
        return logits.tolist()  # type: ignore[no-any-return]
    if logits.shape[0] == 1:
        return (1.0 / (1.0 + np.exp(-logits))).tolist()  # type: ignore[no-any-return]
    shifted = np.exp(logits - logits.max())
    return (shifted / shifted.sum()).tolist()  # type: ignore[no-any-return]
