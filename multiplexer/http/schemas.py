"""Request bodies of the HTTP data plane, as pydantic models: TEI 1.9's and OpenAI's.

Validation is pydantic's, strict (no "true" for true, no 1 for "1") as TEI's serde is;
unknown fields are ignored, as serde does. Each model's docstring and fields end up in
/openapi.json.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

UInt32 = Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
TokenIds = list[UInt32]
TruncationDirection = Literal["Left", "left", "Right", "right"]
# One input is a text or the token ids of one (decoded by the instance, then embedded).
Inputs = str | TokenIds | list[str | TokenIds]

PROMPT_NAME = (
    "The name of a prompt in the model's sentence-transformers configuration; its text is "
    "prepended to every input."
)


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class EmbedRequest(Body):
    """POST {target}/embed: pooled embeddings, one per input."""

    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = Field(None, description=PROMPT_NAME)
    normalize: bool = True
    dimensions: UInt32 | None = Field(
        None, description="Keep the first N dimensions (Matryoshka models)."
    )


class EmbedSparseRequest(Body):
    """POST {target}/embed_sparse: SPLADE embeddings, `[{index, value}]` per input."""

    inputs: Inputs
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = Field(None, description=PROMPT_NAME)


class EmbedAllRequest(EmbedSparseRequest):
    """POST {target}/embed_all: every token's embedding, per input."""


class PredictRequest(Body):
    """POST {target}/predict: a text, a pair `[text, text]`, or a batch of `[text]` and
    `[text, text]`."""

    inputs: str | list[str] | list[list[str]]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    raw_scores: bool = False


class RerankRequest(Body):
    """POST {target}/rerank: score each text against the query, best first."""

    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    raw_scores: bool = False
    return_text: bool = False


class SimilarityInput(Body):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(Body):
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = Field(None, description=PROMPT_NAME)


class SimilarityRequest(Body):
    """POST {target}/similarity: cosine similarity of each sentence to the source one."""

    inputs: SimilarityInput
    parameters: SimilarityParameters | None = None


class TokenizeRequest(Body):
    """POST {target}/tokenize: the tokens of each input."""

    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = Field(None, description=PROMPT_NAME)


class DecodeRequest(Body):
    """POST {target}/decode: the text of each list of token ids."""

    ids: TokenIds | list[TokenIds]
    skip_special_tokens: bool = True


class OpenAIEmbeddingRequest(Body):
    """POST /v1/embeddings (OpenAI's Embeddings API). Under a target, `model` is ignored."""

    input: Inputs = Field(
        description="A text, a list of texts, a list of token ids, or a list of such lists."
    )
    model: str | None = Field(
        None, description="An instance name or a model id (required at the top level)."
    )
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: the little-endian float32 bytes, base64-encoded."
    )
    dimensions: UInt32 | None = None
    user: str | None = Field(None, description="Accepted and ignored.")


class RerankDocument(Body):
    text: str


class OpenAIRerankRequest(Body):
    """POST /v1/rerank, in the shape of Cohere's and Jina's rerank APIs."""

    model: str = Field(description="An instance name or a model id.")
    query: str
    documents: list[str | RerankDocument]
    top_n: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Answer only the best N (default: all)."
    )
    return_documents: bool = Field(True, description="Include each document's text.")


REQUEST_MODELS: tuple[type[Body], ...] = (
    EmbedRequest,
    EmbedSparseRequest,
    EmbedAllRequest,
    PredictRequest,
    RerankRequest,
    SimilarityRequest,
    TokenizeRequest,
    DecodeRequest,
    OpenAIEmbeddingRequest,
    OpenAIRerankRequest,
)
