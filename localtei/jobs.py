"""The unit of work between a request handler, the tokenizers and the inference thread."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from localtei.tokenization import Encoded, TextInput


class Task(Enum):
    POOLED = "embed"  # one vector per input (dense; SPLADE models give vocabulary-sized ones)
    SPARSE = "embed_sparse"  # the non-zero entries of a SPLADE vector
    ALL = "embed_all"  # one vector per token
    SCORES = "predict"  # one score per label


@dataclass(slots=True)
class Job:
    """One input waiting for tokenization (when `source` is set), then for a forward pass."""

    encoded: Encoded | None
    task: Task
    normalize: bool = True
    dimensions: int | None = None
    raw_scores: bool = False
    source: TextInput | None = None  # the text still to tokenize, and how
    handle: Any = None  # whatever the submitter needs to hand the result back
    enqueued_ns: int = 0
    tokenized_ns: int = 0
    queue_ns: int = 0
    inference_ns: int = 0

    @property
    def tokens(self) -> int:
        return len(self.encoded.ids) if self.encoded is not None else 0
