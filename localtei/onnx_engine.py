"""The ONNX Runtime engine, on CPU: the model's own onnx/model.onnx when it ships one that
fits, else an export made once with torch.onnx (see localtei.onnx_export) and cached."""

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
# Intra-op threads sleep as soon as they run out of work instead of spinning: a spinning
# pool takes the cores the gRPC loop and the tokenizers need (see benchmarks/results/).
_SPIN = "0"


class OnnxUnavailable(Exception):
    """ONNX Runtime cannot run this model; the message says why, in one line."""


def load_onnx_engine(spec: ModelSpec, dtype: str, threads: int, cache: Path) -> OnnxEngine:
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
    try:
        session = onnxruntime.InferenceSession(
            str(path), _options(onnxruntime, threads), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # noqa: BLE001 - an unreadable graph is one line in the log
        raise OnnxUnavailable(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from exc
    log.info("ONNX Runtime runs %s", origin)
    return OnnxEngine(spec, session, head.output, dtype, threads)


class OnnxEngine:
    name = "onnx"
    device = "cpu"
    # On CPU a forward pass gains nothing past a few hundred tokens and then loses: bigger
    # intermediate tensors fall out of the caches (see benchmarks/results/).
    batch_tokens: int | None = 512

    def __init__(self, spec: ModelSpec, session: Any, output: str, dtype: str, threads: int):
        self.spec = spec
        self.dtype = dtype
        self.threads = threads
        self._session = session
        self._outputs = [output]
        self._inputs = {i.name: i.type for i in session.get_inputs()}

    def forward(
        self, ids: np.ndarray, mask: np.ndarray, types: np.ndarray, *, hidden: bool, pooled: bool
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        given = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feed = {
            name: given[name] if kind == "tensor(int64)" else given[name].astype(np.int32)
            for name, kind in self._inputs.items()
        }
        (output,) = self._session.run(self._outputs, feed)
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
    options.add_session_config_entry("session.intra_op.allow_spinning", _SPIN)
    options.log_severity_level = 3  # errors only
    return options


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
