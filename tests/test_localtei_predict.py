"""localtei serving a tiny 3-label classifier and a tiny 1-label reranker.

The classifier server runs with --max-concurrent-requests 1, which is also how the
overload behaviour is tested: parallel unary calls are refused, a stream waits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tei.v1 import tei_pb2, tei_pb2_grpc

from tests.localtei_fixtures import (
    TINY_LABELS,
    TinyModels,
    build_tiny_models,
    start_localtei,
)

LONG_TEXT = " ".join(f"token{i}" for i in range(120))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def classifier(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log_path = tmp_path_factory.mktemp("logs") / "classifier.log"
    args = ("--max-concurrent-requests", "1")
    with (
        start_localtei(models.classifier, *args, log_path=log_path) as server,
        server.channel() as channel,
    ):
        yield tei_pb2_grpc.PredictStub(channel), channel, server


@pytest.fixture(scope="module")
def reranker(models: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log_path = tmp_path_factory.mktemp("logs") / "reranker.log"
    args = ("--max-client-batch-size", "4")
    with (
        start_localtei(models.reranker, *args, log_path=log_path) as server,
        server.channel() as channel,
    ):
        yield tei_pb2_grpc.RerankStub(channel), channel, server


def logits_of(model_dir: Path) -> Callable[..., np.ndarray]:
    """The model's logits for a text or a text pair, computed in the test."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()

    def logits(text: str, pair: str | None = None) -> np.ndarray:
        batch = tokenizer([text], [pair] if pair is not None else None, return_tensors="pt")
        with torch.inference_mode():
            return model(**batch).logits[0].numpy()

    return logits


def softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


def sigmoid(value: float) -> float:
    return float(1 / (1 + np.exp(-value)))


def by_label(response: Any) -> dict[str, float]:
    return {p.label: p.score for p in response.predictions}


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def test_it_classifies_with_softmax_scores_sorted(classifier: Any, models: TinyModels) -> None:
    stub, _, _ = classifier
    response = stub.Predict(tei_pb2.PredictRequest(inputs="I love this"))
    expected = softmax(logits_of(models.classifier)("I love this"))
    scores = [p.score for p in response.predictions]
    assert scores == sorted(scores, reverse=True)
    assert by_label(response) == pytest.approx(
        {TINY_LABELS[i]: float(expected[i]) for i in range(3)}, abs=1e-5
    )


def test_it_returns_raw_logits_when_asked(classifier: Any, models: TinyModels) -> None:
    stub, _, _ = classifier
    response = stub.Predict(tei_pb2.PredictRequest(inputs="meh", raw_scores=True))
    expected = logits_of(models.classifier)("meh")
    assert by_label(response) == pytest.approx(
        {TINY_LABELS[i]: float(expected[i]) for i in range(3)}, abs=1e-5
    )


def test_it_classifies_text_pairs(classifier: Any, models: TinyModels) -> None:
    stub, _, _ = classifier
    response = stub.PredictPair(tei_pb2.PredictPairRequest(inputs=["premise", "hypothesis"]))
    expected = softmax(logits_of(models.classifier)("premise", "hypothesis"))
    assert by_label(response) == pytest.approx(
        {TINY_LABELS[i]: float(expected[i]) for i in range(3)}, abs=1e-5
    )
    error = rpc_error(lambda: stub.PredictPair(tei_pb2.PredictPairRequest(inputs=["a", "b", "c"])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_it_streams_predictions(classifier: Any) -> None:
    stub, _, _ = classifier
    texts = ["one", "two", "three"]
    singles = list(stub.PredictStream(iter(tei_pb2.PredictRequest(inputs=t) for t in texts)))
    pairs = list(
        stub.PredictPairStream(iter(tei_pb2.PredictPairRequest(inputs=[t, t]) for t in texts))
    )
    assert [len(r.predictions) for r in singles + pairs] == [3] * 6
    again = stub.Predict(tei_pb2.PredictRequest(inputs="two"))
    assert by_label(singles[1]) == pytest.approx(by_label(again), abs=1e-6)


def test_it_refuses_embeddings_and_rerank_on_a_classifier(classifier: Any) -> None:
    _, channel, _ = classifier
    embed = tei_pb2_grpc.EmbedStub(channel)
    calls = [
        lambda: embed.Embed(tei_pb2.EmbedRequest(inputs="a")),
        lambda: embed.EmbedSparse(tei_pb2.EmbedSparseRequest(inputs="a")),
        lambda: embed.EmbedAll(tei_pb2.EmbedAllRequest(inputs="a")),
        lambda: tei_pb2_grpc.RerankStub(channel).Rerank(
            tei_pb2.RerankRequest(query="q", texts=["a"])
        ),
    ]
    for call in calls:
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "model is not" in error.details()


def test_it_refuses_unary_calls_past_max_concurrent_requests(classifier: Any) -> None:
    stub, _, _ = classifier

    def call(_: int) -> grpc.StatusCode:
        try:
            stub.Predict(tei_pb2.PredictRequest(inputs=LONG_TEXT))
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(call, range(16)))
    assert grpc.StatusCode.OK in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}


def test_a_stream_waits_for_a_permit_instead(classifier: Any) -> None:
    stub, _, _ = classifier
    requests = iter(tei_pb2.PredictRequest(inputs=f"{LONG_TEXT} {i}") for i in range(12))
    assert len(list(stub.PredictStream(requests))) == 12


def test_the_classifier_serves_predict_only(classifier: Any) -> None:
    _, channel, _ = classifier
    info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())
    assert info.model_type == tei_pb2.MODEL_TYPE_CLASSIFIER
    assert info.max_concurrent_requests == 1
    health = health_pb2_grpc.HealthStub(channel)
    serving = {
        name
        for name in ("tei.v1.Embed", "tei.v1.Predict", "tei.v1.Rerank", "tei.v1.Info")
        if health.Check(health_pb2.HealthCheckRequest(service=name)).status
        == health_pb2.HealthCheckResponse.SERVING
    }
    assert serving == {"tei.v1.Predict", "tei.v1.Info"}


def test_it_reranks_with_sigmoid_scores_best_first(reranker: Any, models: TinyModels) -> None:
    stub, _, _ = reranker
    texts = ["first passage", "second passage here", "third"]
    response = stub.Rerank(tei_pb2.RerankRequest(query="which one", texts=texts, return_text=True))
    logits = logits_of(models.reranker)
    expected = {i: sigmoid(logits("which one", text)[0]) for i, text in enumerate(texts)}
    assert {r.index: r.score for r in response.ranks} == pytest.approx(expected, abs=1e-5)
    assert [r.score for r in response.ranks] == sorted(expected.values(), reverse=True)
    assert [r.text for r in response.ranks] == [texts[r.index] for r in response.ranks]
    assert response.metadata.compute_tokens > 0
    raw = stub.Rerank(tei_pb2.RerankRequest(query="which one", texts=texts, raw_scores=True))
    assert {r.index: r.score for r in raw.ranks} == pytest.approx(
        {i: float(logits("which one", t)[0]) for i, t in enumerate(texts)}, abs=1e-5
    )
    assert not any(r.HasField("text") for r in raw.ranks)


def test_it_reranks_a_stream_with_the_first_message_options(reranker: Any) -> None:
    stub, _, _ = reranker
    texts = ["alpha", "beta", "gamma", "delta", "epsilon"]  # more than the batch limit: fine
    requests = [
        tei_pb2.RerankStreamRequest(query="q", text=text, return_text=(i == 0))
        for i, text in enumerate(texts)
    ]
    response = stub.RerankStream(iter(requests))
    assert sorted(r.index for r in response.ranks) == list(range(5))
    assert all(r.text == texts[r.index] for r in response.ranks)
    unary = stub.Rerank(tei_pb2.RerankRequest(query="q", texts=texts[:4]))
    assert {r.index: r.score for r in unary.ranks} == pytest.approx(
        {r.index: r.score for r in response.ranks if r.index < 4}, abs=1e-6
    )


def test_it_rejects_more_texts_than_max_client_batch_size(reranker: Any) -> None:
    stub, _, _ = reranker
    error = rpc_error(lambda: stub.Rerank(tei_pb2.RerankRequest(query="q", texts=["a"] * 5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "5" in error.details() and "4" in error.details()
    error = rpc_error(lambda: stub.Rerank(tei_pb2.RerankRequest(query="q", texts=[])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_reranker_also_predicts_and_serves_both(reranker: Any, models: TinyModels) -> None:
    _, channel, _ = reranker
    response = tei_pb2_grpc.PredictStub(channel).Predict(tei_pb2.PredictRequest(inputs="x"))
    (prediction,) = response.predictions
    assert prediction.label == "LABEL_0"
    assert prediction.score == pytest.approx(sigmoid(logits_of(models.reranker)("x")[0]), abs=1e-5)
    health = health_pb2_grpc.HealthStub(channel)
    statuses = {
        name: health.Check(health_pb2.HealthCheckRequest(service=name)).status
        for name in ("tei.v1.Rerank", "tei.v1.Predict", "tei.v1.Embed")
    }
    serving = health_pb2.HealthCheckResponse.SERVING
    assert [name for name, status in statuses.items() if status == serving] == [
        "tei.v1.Rerank",
        "tei.v1.Predict",
    ]
    info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())
    assert info.model_type == tei_pb2.MODEL_TYPE_RERANKER
