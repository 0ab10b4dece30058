"""The ONNX Runtime engine, on CPU: the model's own onnx/model.onnx when it ships one that
fits, else an export made once with torch.onnx (see localtei.onnx_export) and cached.

A batch that runs alone gets every core (intra-op threads, as TEI). Under load, when the
batcher runs several batches at once (`runners`), each runs on one thread of a second
session: threads that work side by side on separate batches never wait for each other at
an operator's end, so a core taken for a moment by the gRPC loop stalls one batch, not
every thread of the one batch (measured in benchmarks/results/localtei_throughput.md).
The second session holds a second copy of the weights, so it is only made for models
small enough that both copies stay under what the torch engine would take.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from localtei.onnx_export import ExportError, cached_export, cached_quantization, head_of
from localtei.spec import ModelKind, ModelSpec

log = logging.getLogger(__name__)

SHIPPED = Path("onnx") / "model.onnx"
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Intra-op threads spin between the operators of a forward pass (waking a sleeping thread
# for each operator cost a one-text call ~0.8 ms on 2 cores) and stop spinning the moment
# the pass ends, leaving the cores to the gRPC loop and the tokenizers between batches.
_SPINNING = {"session.intra_op.allow_spinning": "1", "session.force_spinning_stop": "1"}
# Up to this much weight, a second session for concurrent batches keeps the engine's memory
# under the torch engine's (torch's runtime alone takes ~400 MiB more than ONNX Runtime's).
RUNNERS_WEIGHT_LIMIT = 200 * 2**20


class OnnxUnavailable(Exception):
    """ONNX Runtime cannot run this model; the message says why, in one line."""


def load_onnx_engine(
    spec: ModelSpec, dtype: str, threads: int, cache: Path, runners: int | None = None
) -> OnnxEngine:
    """`runners`: batches that may run at once (None: see `runners_for`)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime is not installed ({exc})") from exc
    head = head_of(spec)
    path, origin = _shipped(spec, head.output), "the model's own onnx/model.onnx"
    try:
        if path is None:
            path, origin = cached_export(spec, head, cache), "an export cached in " + str(cache)
        if dtype == "int8":
            path = cached_quantization(path, cache)
            origin += ", quantized to int8"
    except ExportError as exc:
        raise OnnxUnavailable(str(exc)) from exc
    session = _session(onnxruntime, path, threads)
    runners = runners_for(threads, _weight_bytes(path), runners)
    # Concurrent batches share one single-threaded session (its Run is thread-safe).
    narrow = _session(onnxruntime, path, 1) if runners > 1 else None
    log.info(
        "ONNX Runtime runs %s on %d threads, %s",
        origin,
        threads,
        f"up to {runners} batches at once" if runners > 1 else "one batch at a time",
    )
    return OnnxEngine(spec, session, head.output, dtype, threads, narrow, runners)


def runners_for(threads: int, weight_bytes: int, configured: int | None) -> int:
    """How many batches may run at once: one per intra-op thread when the model is small
    enough for a second copy of its weights, else one (TEI's way). A configured count
    (LOCALTEI_RUNNERS) wins, up to the thread count."""
    if configured is not None:
        return max(1, min(configured, threads))
    return threads if weight_bytes <= RUNNERS_WEIGHT_LIMIT else 1


def _session(onnxruntime: Any, path: Path, threads: int) -> Any:
    try:
        return onnxruntime.InferenceSession(
            str(path), _options(onnxruntime, threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - an unreadable graph is one line in the log
        raise OnnxUnavailable(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from exc


def _weight_bytes(path: Path) -> int:
    """The graph file and its external data files (`model.onnx_data` and the like)."""
    return sum(
        entry.stat().st_size
        for entry in path.parent.iterdir()
        if entry.is_file() and entry.name.startswith(path.name)
    )


class OnnxEngine:
    name = "onnx"
    device = "cpu"
    # On CPU a forward pass gains nothing past a few hundred tokens and then loses: bigger
    # intermediate tensors fall out of the caches (see benchmarks/results/).
    batch_tokens: int | None = 512

    def __init__(
        self,
        spec: ModelSpec,
        session: Any,
        output: str,
        dtype: str,
        threads: int,
        narrow: Any = None,
        runners: int = 1,
    ):
        self.spec = spec
        self.dtype = dtype
        self.threads = threads
        self.runners = runners if narrow is not None else 1
        self._session = session  # every thread: for a batch that runs alone
        self._narrow = narrow  # one thread: for each of several batches running at once
        self._outputs = [output]
        self._inputs = {i.name: i.type for i in session.get_inputs()}

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
        given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {
            name: given[name] if kind == "tensor(int64)" else given[name].astype(np.int32)
            for name, kind in self._inputs.items()
        }
        session = self._session if alone or self._narrow is None else self._narrow
        (output,) = session.run(self._outputs, feed)
        if self.spec.kind is not ModelKind.EMBEDDING:
            return None, output
        pooled_out = pool(output, mask, self.spec.pooling) if pooled else None
        return (output if hidden else None), pooled_out


def pool(output: np.ndarray, mask: np.ndarray, pooling: str | None) -> np.ndarray:
    """Pool token vectors (batch, tokens, size) over the unmasked tokens; numpy's version
    of the torch engine's pooling."""
    if pooling == "splade":
        # max over tokens of log(1 + relu(logits)), padding masked out; in place: it is big.
        activated = np.maximum(output, 0, out=output if output.flags.writeable else None)
        np.log1p(activated, out=activated)
        activated *= mask[:, :, None].astype(activated.dtype)
        return activated.max(axis=1)  # type: ignore[no-any-return]
    if pooling == "mean":
        weights = mask.astype(output.dtype)
        sums = np.einsum("bth,bt->bh", output, weights)
        return sums / np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)  # type: ignore[no-any-return]
    if pooling == "last-token":
        return output[np.arange(output.shape[0]), mask.sum(axis=1) - 1]  # type: ignore[no-any-return]
    return output[:, 0]


def _shipped(spec: ModelSpec, output: str) -> Path | None:
    """The repository's onnx/model.onnx, if it has one that gives what this model needs."""
    path = spec.path / SHIPPED
    if not path.is_file():
        return None
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001
        log.warning("%s is not readable (%s): exporting the model instead", path, exc)
        return None
    inputs = {i.name for i in graph.input} - {i.name for i in graph.initializer}
    outputs = [o.name for o in graph.output]
    if output not in outputs or not {"input_ids", "attention_mask"} <= inputs <= set(_INPUTS):
        log.warning(
            "%s has inputs %s and outputs %s, not the %s this model needs: exporting instead",
            path,
            sorted(inputs),
            outputs,
            output,
        )
        return None
    return path


def _options(onnxruntime: Any, threads: int) -> Any:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    for key, value in _SPINNING.items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3  # errors only
    return options


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
