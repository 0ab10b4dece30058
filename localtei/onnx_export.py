"""ONNX files made once per model and kept in a cache, written atomically.

`cached_export(spec, head, cache)` returns `cache/<key>/model.onnx`, where the key is a
hash of the model's config and weights, the head the model kind needs, and the versions
of the exporting libraries. A missing file is made by a child process,
`python -m localtei.onnx_export export MODEL_DIR HEAD OUT`, which loads the model with
transformers, exports it with `torch.onnx.export(..., dynamo=True)` and checks that ONNX
Runtime reproduces torch on it: the server itself never imports torch for this, and keeps
none of the export's memory. `cached_quantization` does the same for int8 (ONNX Runtime's
dynamic quantization).

Concurrency: the file is written into a scratch folder that is renamed into place whole
(a reader sees a complete folder or none), under an exclusive lock on `<key>.lock`: a
second process that wants the same file waits for the first and reuses its file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localtei.spec import ModelKind, ModelSpec

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
# Bump when the exported graph changes for the same model and libraries.
EXPORT_FORMAT = "localtei-onnx-1"
QUANTIZE_FORMAT = "localtei-int8-per-channel-1"
EXPORT_TIMEOUT_SECONDS = 1800
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json")
_LIBRARIES = ("torch", "transformers", "onnxscript", "onnx", "onnxruntime")
_children: set[subprocess.Popen[str]] = set()
_children_lock = threading.Lock()
_cancelled = False  # the server is stopping: start no more children


class ExportError(Exception):
    """No ONNX file could be made; the message says why, in one line."""


@dataclass(frozen=True)
class Head:
    """Which transformers class to export, and the output the engine reads."""

    name: str  # "base", "masked-lm" or "sequence-classification"
    output: str  # "last_hidden_state" or "logits"


def head_of(spec: ModelSpec) -> Head:
    if spec.kind is not ModelKind.EMBEDDING:
        return Head("sequence-classification", "logits")
    if spec.is_splade:
        return Head("masked-lm", "logits")
    return Head("base", "last_hidden_state")


def cached_export(spec: ModelSpec, head: Head, cache: Path) -> Path:
    key = f"{head.name}-{_hash_model(spec.path, head)}"

    def export(scratch: Path) -> None:
        _run_child("export", str(spec.path), head.name, str(scratch / MODEL_FILE))

    return _cached(cache, key, export, "Exporting the model to ONNX")


def cached_quantization(source: Path, cache: Path) -> Path:
    key = f"int8-{_hash_files([source], QUANTIZE_FORMAT, _versions())}"

    def quantize(scratch: Path) -> None:
        _run_child("quantize", str(source), str(scratch / MODEL_FILE))

    return _cached(cache, key, quantize, "Quantizing the ONNX model to int8")


def cancel_exports() -> None:
    """Stop the export children, and start no more (the server stops while it loads)."""
    global _cancelled
    with _children_lock:
        _cancelled = True
        children = list(_children)
    for child in children:
        with contextlib.suppress(OSError):
            child.kill()


def _cached(cache: Path, key: str, make: Callable[[Path], None], what: str) -> Path:
    final = cache / key
    if (final / MODEL_FILE).is_file():
        return final / MODEL_FILE
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / f"{key}.lock"):
            if (final / MODEL_FILE).is_file():  # made by another process while we waited
                return final / MODEL_FILE
            for stale in cache.glob(f".tmp-{key}-*"):  # left by a process that was killed
                shutil.rmtree(stale, ignore_errors=True)
            scratch = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache))
            scratch.chmod(0o755)  # a shared cache: readable by every user, like the HF cache
            try:
                log.info("%s (once; kept in %s)", what, final)
                started = time.perf_counter()
                make(scratch)
                _sync(scratch)
                _publish(scratch, final)
                log.info("%s took %.1fs", what, time.perf_counter() - started)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except OSError as exc:
        raise ExportError(f"cannot write to the ONNX cache {cache}: {exc}") from exc
    return final / MODEL_FILE


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(scratch: Path, final: Path) -> None:
    """Rename the finished folder into place; if one is there already, keep that one."""
    try:
        os.rename(scratch, final)
    except OSError:
        if not (final / MODEL_FILE).is_file():
            raise
        return
    with contextlib.suppress(OSError):
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _sync(folder: Path) -> None:
    for file in folder.iterdir():
        with file.open("rb") as handle:
            os.fsync(handle.fileno())


def _run_child(*args: str) -> None:
    package_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with _children_lock:
        if _cancelled:
            raise ExportError(f"{args[0]} cancelled: the server is stopping")
        child = subprocess.Popen(
            [sys.executable, "-m", "localtei.onnx_export", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        _children.add(child)
    try:
        output, _ = child.communicate(timeout=EXPORT_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        raise ExportError(f"{args[0]} took more than {EXPORT_TIMEOUT_SECONDS}s") from None
    finally:
        _children.discard(child)
    if child.returncode != 0:
        lines = [line for line in output.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {child.returncode}"
        raise ExportError(f"{args[0]} failed: {reason.removeprefix('error: ')}")


def _hash_model(path: Path, head: Head) -> str:
    files = sorted(
        f for f in path.iterdir() if f.is_file() and f.suffix in _WEIGHT_SUFFIXES and _weights(f)
    )
    return _hash_files(files, EXPORT_FORMAT, head.name, _versions())


def _weights(file: Path) -> bool:
    # config.json, the weights and their index: what the exported graph is made of.
    name = file.name
    return name == "config.json" or name.startswith(("model", "pytorch_model"))


def _hash_files(files: Sequence[Path], *salt: str) -> str:
    digest = hashlib.sha256("\n".join(salt).encode())
    for file in files:
        with file.open("rb") as handle:
            digest.update(file.name.encode() + b"\0")
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:32]


def _versions() -> str:
    found = []
    for name in _LIBRARIES:
        try:
            found.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return ",".join(found)


# --- the child process -------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """`export MODEL_DIR HEAD OUT` or `quantize IN OUT`; the last line says why it failed."""
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    try:
        if argv[0] == "export":
            export(Path(argv[1]), argv[2], Path(argv[3]))
        elif argv[0] == "quantize":
            quantize(Path(argv[1]), Path(argv[2]))
        else:
            raise ValueError(f"unknown command {argv[0]!r}")
    except Exception as exc:  # noqa: BLE001 - the parent shows this one line
        text = str(exc).strip()
        print(f"error: {text.splitlines()[0] if text else type(exc).__name__}", flush=True)
        return 1
    return 0


def export(model_dir: Path, head: str, out: Path) -> None:
    import inspect

    import torch
    import transformers

    from localtei.settings import default_num_threads

    torch.set_num_threads(default_num_threads())
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    auto: Any = {
        "base": transformers.AutoModel,
        "masked-lm": transformers.AutoModelForMaskedLM,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
    }[head]
    model = auto.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    model.eval()
    output = "last_hidden_state" if head == "base" else "logits"
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        names.append("token_type_ids")
    wrapper = _wrap(model, output, "token_type_ids" in names)
    config = model.config
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("sequence")
    program = torch.onnx.export(
        wrapper,
        tuple(_sample(config, 2, 16, padded=True)[name] for name in names),
        input_names=names,
        output_names=[output],
        dynamic_shapes={name: {0: batch, 1: tokens} for name in names},
        dynamo=True,
        optimize=True,
        verbose=False,
    )
    assert program is not None
    program.save(str(out))
    _verify(
        wrapper, out, names, config, per_token=output == "last_hidden_state" or head == "masked-lm"
    )


def quantize(source: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Per-channel scales, and only the matmuls with a weight: per-tensor scales (the
    # default) cost MiniLM up to 0.06 of cosine; these keep it within 0.02.
    quantize_dynamic(
        source,
        out,
        weight_type=QuantType.QInt8,
        per_channel=True,
        extra_options={"MatMulConstBOnly": True},
    )


def _sample(config: Any, rows: int, tokens: int, padded: bool) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    vocab = int(config.vocab_size)
    pad = int(getattr(config, "pad_token_id", None) or 0)
    ids = torch.randint(min(1000, vocab - 1), vocab, (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    if padded:
        for row in range(1, rows):
            mask[row, tokens - 3 * row :] = 0
        ids[mask == 0] = pad
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _verify(model: Any, path: Path, names: list[str], config: Any, per_token: bool) -> None:
    """ONNX Runtime must reproduce torch on unpadded and padded batches of other shapes."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for rows, tokens, padded in ((1, 7, False), (3, 13, True)):
        sample = _sample(config, rows, tokens, padded)
        with torch.inference_mode():
            expected = model(*(sample[name] for name in names)).numpy()
        (got,) = session.run(None, {name: sample[name].numpy() for name in names})
        mask = sample["attention_mask"].numpy().astype(bool)
        for row in range(rows):
            a = expected[row][mask[row]] if per_token else expected[row]
            b = got[row][mask[row]] if per_token else got[row]
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            diff = float(np.abs(a - b).max())
            if diff > 1e-3 * max(1.0, float(np.abs(a).max())):
                raise ExportError(f"the exported graph differs from torch by up to {diff:.3g}")


def _wrap(model: Any, output: str, with_types: bool) -> Any:
    """The model with tensor inputs by name, giving the one output the engine reads."""
    import torch

    class Output(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask), output)

    class OutputWithTypes(Output):
        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:  # type: ignore[override]
            result = self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return getattr(result, output)

    return (OutputWithTypes if with_types else Output)().eval()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
