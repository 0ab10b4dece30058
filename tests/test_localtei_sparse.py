"""localtei with `--pooling splade` on a tiny random BertForMaskedLM."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tei.v1 import tei_pb2, tei_pb2_grpc

from tests.localtei_fixtures import LocalTEI, build_tiny_model, start_localtei

TEXTS = ["sparse retrieval with splade", "another short text", "x"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_model("splade", tmp_path_factory.mktemp("models") / "splade")


@pytest.fixture(scope="module")
def server(model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTEI]:
    log_path = tmp_path_factory.mktemp("logs") / "splade.log"
    with start_localtei(model_dir, "--pooling", "splade", log_path=log_path) as started:
        yield started


@pytest.fixture(scope="module")
def embed(server: LocalTEI) -> Iterator[tei_pb2_grpc.EmbedStub]:
    with server.channel() as channel:
        yield tei_pb2_grpc.EmbedStub(channel)


@pytest.fixture(scope="module")
def reference(model_dir: Any) -> Any:
    """SPLADE computed in the test: max over tokens of log(1 + relu(MLM logits))."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForMaskedLM.from_pretrained(str(model_dir)).eval()

    def splade(text: str) -> np.ndarray:
        batch = tokenizer([text], return_tensors="pt")
        with torch.inference_mode():
            logits = model(**batch).logits[0]
        return torch.log1p(torch.relu(logits)).max(dim=0).values.numpy()

    return splade


def as_dense(values: Any, size: int = 30522) -> np.ndarray:
    dense = np.zeros(size, dtype=np.float32)
    for value in values:
        dense[value.index] = value.value
    return dense


def test_it_returns_only_the_nonzero_splade_weights(
    embed: tei_pb2_grpc.EmbedStub, reference: Any
) -> None:
    for text in TEXTS:
        response = embed.EmbedSparse(tei_pb2.EmbedSparseRequest(inputs=text))
        expected = reference(text)
        assert len(response.sparse_embeddings) == np.count_nonzero(expected) > 0
        assert all(value.value > 0 for value in response.sparse_embeddings)
        assert np.allclose(as_dense(response.sparse_embeddings), expected, atol=1e-4)


def test_it_streams_sparse_embeddings_in_order(
    embed: tei_pb2_grpc.EmbedStub, reference: Any
) -> None:
    requests = iter(tei_pb2.EmbedSparseRequest(inputs=t) for t in TEXTS)
    responses = list(embed.EmbedSparseStream(requests))
    for response, text in zip(responses, TEXTS, strict=True):
        assert np.allclose(as_dense(response.sparse_embeddings), reference(text), atol=1e-4)


def test_dense_embed_gives_the_vocabulary_vector_without_normalizing(
    embed: tei_pb2_grpc.EmbedStub, reference: Any
) -> None:
    response = embed.Embed(tei_pb2.EmbedRequest(inputs=TEXTS[0], normalize=False))
    assert np.allclose(response.embeddings, reference(TEXTS[0]), atol=1e-4)


def test_it_refuses_to_normalize_or_embed_all_tokens(embed: tei_pb2_grpc.EmbedStub) -> None:
    for call in (
        lambda: embed.Embed(tei_pb2.EmbedRequest(inputs="a")),  # normalize defaults to true
        lambda: embed.EmbedAll(tei_pb2.EmbedAllRequest(inputs="a")),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "SPLADE" in caught.value.details()


def test_it_serves_embed_but_not_predict(server: LocalTEI) -> None:
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        statuses = {
            name: stub.Check(health_pb2.HealthCheckRequest(service=name)).status
            for name in ("tei.v1.Embed", "tei.v1.Predict")
        }
        info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())
    assert statuses == {
        "tei.v1.Embed": health_pb2.HealthCheckResponse.SERVING,
        "tei.v1.Predict": health_pb2.HealthCheckResponse.NOT_SERVING,
    }
    assert info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING
    assert info.max_input_length == 512  # no sentence-transformers config: the positions
