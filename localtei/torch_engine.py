"""The torch engine: transformers' model in eager mode, on CPU or CUDA (fp16 when asked)."""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

import numpy as np
import torch

from localtei.errors import StartupError
from localtei.spec import ModelKind, ModelSpec

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_torch_engine(spec: ModelSpec, dtype: str | None, device: str, threads: int) -> TorchEngine:
    torch.set_num_threads(threads)
    # One forward pass at a time: no inter-op pool needed (fails if torch already used one).
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    dtype = dtype or ("float16" if device.startswith("cuda") else "float32")
    module = load_module(spec, DTYPES[dtype], device)
    return TorchEngine(spec, module, device, dtype, threads)


class TorchEngine:
    name = "torch"
    batch_tokens: int | None = None
    runners = 1  # one forward pass at a time, on every thread

    def __init__(
        self, spec: ModelSpec, module: torch.nn.Module, device: str, dtype: str, threads: int
    ) -> None:
        self.spec = spec
        self.module = module
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self._device = torch.device(device)
        self._takes_token_types = "token_type_ids" in inspect.signature(module.forward).parameters
        # Classifiers and SPLADE read the logits; the rest the last hidden state.
        self._logits = spec.kind is not ModelKind.EMBEDDING or spec.is_splade

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
        with torch.inference_mode():
            attention = torch.from_numpy(mask).to(self._device)
            inputs = {
                "input_ids": torch.from_numpy(ids).to(self._device),
                "attention_mask": attention,
            }
            if self._takes_token_types:
                inputs["token_type_ids"] = torch.from_numpy(types).to(self._device)
            out = self.module(**inputs)
            if self._logits and self.spec.kind is not ModelKind.EMBEDDING:
                return None, out.logits.float().cpu().numpy()
            output = (out.logits if self._logits else out.last_hidden_state).float()
            # Token vectors are copied out only when asked for; same for pooling.
            hidden_out = output.cpu().numpy() if hidden else None
            pooled_out = (
                _pool(output, attention, self.spec.pooling).cpu().numpy() if pooled else None
            )
        return hidden_out, pooled_out


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


def load_module(spec: ModelSpec, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The transformers model with the head the model kind needs, in eval mode."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        module = auto_class(spec).from_pretrained(
            str(spec.path), dtype=dtype, local_files_only=True
        )
    except Exception as exc:  # noqa: BLE001 - any failure to load is one start-up error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first_line = first_line.replace(str(spec.path), f"'{spec.name}'")
        raise StartupError(f"model '{spec.name}' is not loadable: {first_line}") from exc
    return module.to(device).eval()  # type: ignore[no-any-return]


def auto_class(spec: ModelSpec) -> Any:
    import transformers

    if spec.kind is not ModelKind.EMBEDDING:
        return transformers.AutoModelForSequenceClassification
    if spec.is_splade:
        return transformers.AutoModelForMaskedLM
    return transformers.AutoModel
