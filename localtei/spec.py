"""What a model is, decided from its JSON files the way TEI decides it (no torch needed)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from localtei.errors import StartupError

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "splade", "last-token")

# TEI reads the first of these it finds for `max_seq_length`.
_ST_CONFIG_NAMES = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)
# RoBERTa-style position ids start after the padding index.
_OFFSET_MODEL_TYPES = ("xlm-roberta", "camembert", "roberta")


class ModelKind(Enum):
    EMBEDDING = "embedding"
    CLASSIFIER = "classifier"
    RERANKER = "reranker"


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    kind: ModelKind
    pooling: str | None  # None for classifiers and rerankers
    labels: list[str]  # id2label in id order, empty for embedding models
    max_input_length: int
    hidden_size: int
    prompts: dict[str, str] = field(default_factory=dict)
    architectures: list[str] = field(default_factory=list)
    name: str = ""  # how messages name the model: its id, never the host's path
    vocab_size: int = 0
    pad_token_id: int = 0

    @property
    def is_splade(self) -> bool:
        return self.pooling == "splade"


def describe_model(path: Path, pooling: str | None = None, name: str | None = None) -> ModelSpec:
    """Read config.json and the sentence-transformers files; StartupError if unusable.

    `name` (the model id) is how errors name the model: they never show the host's path.
    """
    name = name or path.name
    config = _read_json(path / "config.json")
    if config is None:
        raise StartupError(f"model '{name}' is not loadable: no readable config.json")
    architectures = list(config.get("architectures") or [])
    kind, labels = _kind_and_labels(config, architectures)
    if kind is not ModelKind.EMBEDDING:
        if pooling is not None:
            log.warning("`--pooling %s` is ignored: the model is a %s", pooling, kind.value)
        pooling = None
    elif pooling == "splade":
        if not any(a.endswith("ForMaskedLM") for a in architectures):
            raise StartupError(
                f"`--pooling splade` needs a model with a masked-language-model head "
                f"(*ForMaskedLM); model '{name}' has architectures {architectures}"
            )
    elif pooling is None:
        pooling = _pooling_from_sentence_transformers(path, name)
    return ModelSpec(
        path=path,
        kind=kind,
        pooling=pooling,
        labels=labels,
        max_input_length=_max_input_length(path, config),
        hidden_size=int(config.get("hidden_size") or config.get("d_model") or 0),
        prompts=_prompts(path),
        architectures=architectures,
        name=name,
        vocab_size=int(config.get("vocab_size") or 0),
        pad_token_id=int(config.get("pad_token_id") or 0),
    )


def _kind_and_labels(
    config: dict[str, Any], architectures: list[str]
) -> tuple[ModelKind, list[str]]:
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        return ModelKind.EMBEDDING, []
    id2label = config.get("id2label") or {}
    if id2label:
        labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
    else:
        labels = [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]
    return (ModelKind.RERANKER if len(labels) == 1 else ModelKind.CLASSIFIER), labels


def _pooling_from_sentence_transformers(path: Path, name: str) -> str:
    pool = _read_json(path / "1_Pooling" / "config.json")
    if pool is None:
        log.warning(
            "`--pooling` is not set and the model has no 1_Pooling/config.json: using CLS pooling"
        )
        return "cls"
    if pool.get("pooling_mode_cls_token"):
        return "cls"
    if pool.get("pooling_mode_mean_tokens"):
        return "mean"
    if pool.get("pooling_mode_lasttoken"):
        return "last-token"
    raise StartupError(
        f"pooling configuration {pool} in 1_Pooling/config.json of model '{name}' is not supported"
    )


def _max_input_length(path: Path, config: dict[str, Any]) -> int:
    for name in _ST_CONFIG_NAMES:
        st_config = _read_json(path / name)
        if st_config is not None and st_config.get("max_seq_length"):
            return int(st_config["max_seq_length"])
    offset = 0
    if config.get("model_type") in _OFFSET_MODEL_TYPES:
        offset = int(config.get("pad_token_id") or 0) + 1
    positions = config.get("max_position_embeddings") or config.get("n_positions") or 512
    return int(positions) - offset


def _prompts(path: Path) -> dict[str, str]:
    st_config = _read_json(path / "config_sentence_transformers.json") or {}
    prompts = st_config.get("prompts") or {}
    return {str(k): str(v) for k, v in prompts.items()}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
