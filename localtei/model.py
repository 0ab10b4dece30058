"""Load a model with transformers and run batches of tokenized inputs through it.

`load_model()` is also the in-process API (see the package docstring): the server and a
benchmark baseline share this exact code path.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from localtei.errors import BackendError, StartupError
from localtei.jobs import Job, Task
from localtei.lookup import ModelLocation, find_model
from localtei.spec import ModelKind, ModelSpec, describe_model
from localtei.tokenization import TextTokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_num_threads() -> int:
    """Torch threads for the forward pass: LOCALTEI_NUM_THREADS, else all cores but one.

    The spare core runs the gRPC event loop and tokenization: intra-op threads on every
    core stall each other (OpenMP waits for a descheduled peer) as soon as anything else
    runs. On an idle 2-core box, 2 threads served more (177 vs 120 Embed/s to 16 callers),
    but with a multiplexer or a client on the same cores they lost on latency and on
    throughput per caller; see benchmarks/results/.
    """
    configured = int(os.environ.get("LOCALTEI_NUM_THREADS") or 0)
    return configured or max(1, len(os.sched_getaffinity(0)) - 1)


def load_model(
    model_id: str,
    pooling: str | None = None,
    dtype: str | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    device: str | None = None,
    default_prompt: str | None = None,
    default_prompt_name: str | None = None,
    max_input_length: int | None = None,
    found: tuple[ModelLocation, ModelSpec] | None = None,
) -> Model:
    """Find, describe and load a model; StartupError with one clear line when impossible.

    `max_input_length` caps the model's own limit (the server passes `--max-batch-tokens`).
    `found`: where the model is and what it is, when the caller has looked already.
    """
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    module = _load_module(spec, DTYPES[dtype], device)
    return Model(model_id, spec, module, tokenizer, device, dtype, location.sha)


class Model:
    """A loaded model: `run()` does one padded forward pass for a batch of jobs."""

    def __init__(
        self,
        model_id: str,
        spec: ModelSpec,
        module: torch.nn.Module,
        tokenizer: TextTokenizer,
        device: str,
        dtype: str,
        sha: str | None = None,
    ) -> None:
        self.model_id = model_id
        self.spec = spec
        self.module = module
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.sha = sha
        config = module.config
        self.pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or 0)
        self._takes_token_types = "token_type_ids" in inspect.signature(module.forward).parameters

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

    def run(self, jobs: Sequence[Job]) -> list[Any]:
        """Results in job order: a vector, (indices, values), token vectors, or scores."""
        start = time.perf_counter_ns()
        with torch.inference_mode():
            lengths = [len(job.encoded.ids) for job in jobs]
            output, mask = self._forward(jobs, lengths)
            results = self._results(jobs, lengths, output, mask)
        elapsed = time.perf_counter_ns() - start
        for job in jobs:
            job.inference_ns = elapsed
        return results

    def embed(
        self, texts: Sequence[str], normalize: bool = True, batch_size: int = 32
    ) -> np.ndarray:
        """Pooled embeddings of `texts` (truncated to the model's limit), shape (n, size)."""
        self.check(Task.POOLED, normalize)
        vectors: list[list[float]] = []
        for i in range(0, len(texts), batch_size):
            jobs = [
                Job(self.tokenizer.encode(text, truncate=True), Task.POOLED, normalize)
                for text in texts[i : i + batch_size]
            ]
            vectors.extend(self.run(jobs))
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), self.output_size)

    def warm_up(self) -> None:
        """One forward pass, so the first request does not pay for lazy initialisation."""
        task = Task.POOLED if self.spec.kind is ModelKind.EMBEDDING else Task.SCORES
        self.run([Job(self.tokenizer.encode("Warming up the model."), task, normalize=False)])

    def _forward(
        self, jobs: Sequence[Job], lengths: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(lengths)
        ids = np.full((len(jobs), width), self.pad_id, dtype=np.int64)
        types = np.zeros((len(jobs), width), dtype=np.int64)
        mask = np.zeros((len(jobs), width), dtype=np.int64)
        for row, (job, length) in enumerate(zip(jobs, lengths, strict=True)):
            ids[row, :length] = job.encoded.ids
            types[row, :length] = job.encoded.type_ids
            mask[row, :length] = 1
        inputs = {
            "input_ids": torch.from_numpy(ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }
        if self._takes_token_types:
            inputs["token_type_ids"] = torch.from_numpy(types).to(self.device)
        out = self.module(**inputs)
        if self.spec.kind is not ModelKind.EMBEDDING or self.spec.is_splade:
            return out.logits.float(), inputs["attention_mask"]
        return out.last_hidden_state.float(), inputs["attention_mask"]

    def _results(
        self, jobs: Sequence[Job], lengths: list[int], output: torch.Tensor, mask: torch.Tensor
    ) -> list[Any]:
        if self.spec.kind is not ModelKind.EMBEDDING:
            logits = output.cpu().numpy()
            return [_scores(row, job.raw_scores) for row, job in zip(logits, jobs, strict=True)]
        # Token vectors are copied out only when some job asks for them; same for pooling.
        tasks = {job.task for job in jobs}
        hidden = output.cpu().numpy() if Task.ALL in tasks else None
        pooled = None
        if tasks - {Task.ALL}:
            pooled = _pool(output, mask, self.spec.pooling).cpu().numpy()
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


def _pool(output: torch.Tensor, mask: torch.Tensor, pooling: str | None) -> torch.Tensor:
    if pooling == "splade":
        # max over tokens of log(1 + relu(logits)), padding masked out; in place: it is big.
        activated = output.relu_().log1p_().mul_(mask.unsqueeze(-1).to(output.dtype))
        return activated.max(dim=1).values
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(output.dtype)
        return (output * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
    if pooling == "last-token":
        last = mask.sum(dim=1) - 1
        return output[torch.arange(output.shape[0], device=output.device), last]
    return output[:, 0]


def _dense(vector: np.ndarray, normalize: bool, dimensions: int | None) -> list[float]:
    if dimensions is not None:
        vector = vector[:dimensions]
    if normalize:
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
    return vector.tolist()


def _scores(logits: np.ndarray, raw_scores: bool) -> list[float]:
    if raw_scores:
        return logits.tolist()
    if logits.shape[0] == 1:
        return (1.0 / (1.0 + np.exp(-logits))).tolist()
    shifted = np.exp(logits - logits.max())
    return (shifted / shifted.sum()).tolist()


def _load_module(spec: ModelSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if spec.kind is not ModelKind.EMBEDDING:
        auto: Any = transformers.AutoModelForSequenceClassification
    elif spec.is_splade:
        auto = transformers.AutoModelForMaskedLM
    else:
        auto = transformers.AutoModel
    try:
        module = auto.from_pretrained(str(spec.path), dtype=dtype, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load is one start-up error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first_line = first_line.replace(str(spec.path), f"'{spec.name}'")
        raise StartupError(f"model '{spec.name}' is not loadable: {first_line}") from exc
    return module.to(device).eval()
