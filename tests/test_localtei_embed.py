"""localtei serving all-MiniLM-L6-v2: embeddings, tokens, errors, health, metrics, logs.

One server for the module: the packaged model, copied with prompts into a Hugging Face
cache layout (so the cache lookup is exercised too), started with --json-output.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tei.v1 import tei_pb2, tei_pb2_grpc

from tests.localtei_fixtures import (
    LocalTEI,
    build_hf_cache,
    build_prompt_model,
    minilm_path,
    start_localtei,
)

REPO_ID = "localtei-test/minilm-with-prompts"
PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors.",
    "A completely different sentence about cooking pasta.",
    "hello",
]
LONG_TEXT = " ".join(f"word{i}" for i in range(400))  # far past the 256-token limit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTEI]:
    root = tmp_path_factory.mktemp("localtei-embed")
    model_dir = build_prompt_model(root / "minilm-prompts", PROMPTS)
    cache = build_hf_cache(root / "hf-cache", REPO_ID, model_dir)
    args = (
        "--huggingface-hub-cache",
        str(cache),
        "--json-output",
        "--max-concurrent-requests",
        "64",
    )
    with start_localtei(REPO_ID, *args, log_path=root / "localtei.log") as started:
        yield started


@pytest.fixture(scope="module")
def channel(server: LocalTEI) -> Iterator[grpc.Channel]:
    with server.channel() as opened:
        yield opened


@pytest.fixture(scope="module")
def embed(channel: grpc.Channel) -> tei_pb2_grpc.EmbedStub:
    return tei_pb2_grpc.EmbedStub(channel)


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


class Reference:
    """An independent computation with plain transformers: tokenizer, forward, mean pool."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        self.model = AutoModel.from_pretrained(str(minilm_path())).eval()

    def embed(self, texts: list[str], normalize: bool = True, side: str = "right") -> np.ndarray:
        self.tokenizer.truncation_side = side
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=256, return_tensors="pt"
        )
        with self.torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        if normalize:
            pooled = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled

    def token_vectors(self, text: str) -> np.ndarray:
        batch = self.tokenizer([text], return_tensors="pt")
        with self.torch.inference_mode():
            return self.model(**batch).last_hidden_state[0].numpy()


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_it_embeds_like_a_plain_transformers_forward(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference
) -> None:
    # (sentence-transformers computes the same; importing it costs a test run ~20 s.)
    expected = reference.embed(TEXTS)
    for text, vector in zip(TEXTS, expected, strict=True):
        response = embed.Embed(tei_pb2.EmbedRequest(inputs=text))
        assert len(response.embeddings) == 384
        assert cosine(response.embeddings, vector) >= 0.999


def test_it_normalizes_unless_told_not_to(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference
) -> None:
    text = TEXTS[0]
    default = np.array(embed.Embed(tei_pb2.EmbedRequest(inputs=text)).embeddings)
    raw = np.array(embed.Embed(tei_pb2.EmbedRequest(inputs=text, normalize=False)).embeddings)
    assert np.linalg.norm(default) == pytest.approx(1.0, abs=1e-4)
    expected_raw = reference.embed([text], normalize=False)[0]
    assert np.linalg.norm(raw) == pytest.approx(np.linalg.norm(expected_raw), rel=1e-3)
    assert cosine(raw, expected_raw) >= 0.999


def test_it_keeps_the_first_dimensions_then_normalizes(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference
) -> None:
    response = embed.Embed(tei_pb2.EmbedRequest(inputs=TEXTS[1], dimensions=64))
    assert len(response.embeddings) == 64
    head = reference.embed([TEXTS[1]], normalize=False)[0][:64]
    assert np.allclose(response.embeddings, head / np.linalg.norm(head), atol=1e-4)
    raw = embed.Embed(tei_pb2.EmbedRequest(inputs=TEXTS[1], dimensions=64, normalize=False))
    assert np.allclose(raw.embeddings, head, atol=1e-4)


def test_it_rejects_more_dimensions_than_the_model_has(embed: tei_pb2_grpc.EmbedStub) -> None:
    code, details = status_of(lambda: embed.Embed(tei_pb2.EmbedRequest(inputs="x", dimensions=385)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "384" in details


@pytest.mark.parametrize(
    ("direction", "side"),
    [
        (tei_pb2.TRUNCATION_DIRECTION_RIGHT, "right"),
        (tei_pb2.TRUNCATION_DIRECTION_LEFT, "left"),
    ],
)
def test_it_truncates_long_input_on_the_side_asked(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference, direction: int, side: str
) -> None:
    request = tei_pb2.EmbedRequest(inputs=LONG_TEXT, truncate=True, truncation_direction=direction)
    response = embed.Embed(request)
    assert response.metadata.compute_tokens == 256
    assert cosine(response.embeddings, reference.embed([LONG_TEXT], side=side)[0]) >= 0.999
    other = "left" if side == "right" else "right"
    assert cosine(response.embeddings, reference.embed([LONG_TEXT], side=other)[0]) < 0.99


def test_it_rejects_too_long_input_naming_the_limit(embed: tei_pb2_grpc.EmbedStub) -> None:
    code, details = status_of(lambda: embed.Embed(tei_pb2.EmbedRequest(inputs=LONG_TEXT)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("`inputs` must have less than 256 tokens. Given: ")


def test_it_rejects_empty_input(embed: tei_pb2_grpc.EmbedStub) -> None:
    for call in (
        lambda: embed.Embed(tei_pb2.EmbedRequest(inputs="")),
        lambda: embed.EmbedAll(tei_pb2.EmbedAllRequest(inputs="")),
    ):
        code, details = status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "empty" in details


def test_it_prepends_the_named_prompt(embed: tei_pb2_grpc.EmbedStub) -> None:
    with_prompt = embed.Embed(tei_pb2.EmbedRequest(inputs="what is tei", prompt_name="query"))
    spelled_out = embed.Embed(tei_pb2.EmbedRequest(inputs="query: what is tei"))
    plain = embed.Embed(tei_pb2.EmbedRequest(inputs="what is tei"))
    assert np.allclose(with_prompt.embeddings, spelled_out.embeddings, atol=1e-5)
    assert cosine(with_prompt.embeddings, plain.embeddings) < 0.999


def test_it_rejects_an_unknown_prompt_name(embed: tei_pb2_grpc.EmbedStub) -> None:
    code, details = status_of(
        lambda: embed.Embed(tei_pb2.EmbedRequest(inputs="x", prompt_name="nope"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in details and "query" in details


def test_it_returns_one_vector_per_token(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference
) -> None:
    response = embed.EmbedAll(tei_pb2.EmbedAllRequest(inputs=TEXTS[1]))
    expected = reference.token_vectors(TEXTS[1])
    got = np.array([token.embeddings for token in response.token_embeddings])
    assert got.shape == expected.shape
    assert np.allclose(got, expected, atol=1e-3)
    assert response.metadata.compute_tokens == expected.shape[0]


def test_streams_answer_every_message_in_order(
    embed: tei_pb2_grpc.EmbedStub, reference: Reference
) -> None:
    expected = reference.embed(TEXTS)
    responses = list(embed.EmbedStream(iter(tei_pb2.EmbedRequest(inputs=t) for t in TEXTS)))
    assert [cosine(r.embeddings, e) >= 0.999 for r, e in zip(responses, expected, strict=True)] == [
        True
    ] * len(TEXTS)
    all_tokens = list(
        embed.EmbedAllStream(iter(tei_pb2.EmbedAllRequest(inputs=t) for t in TEXTS[:2]))
    )
    assert [len(r.token_embeddings) for r in all_tokens] == [
        len(reference.tokenizer(t)["input_ids"]) for t in TEXTS[:2]
    ]


def test_a_stream_ends_with_the_error_of_a_bad_message(embed: tei_pb2_grpc.EmbedStub) -> None:
    requests = [tei_pb2.EmbedRequest(inputs="fine"), tei_pb2.EmbedRequest(inputs="")]
    code, _ = status_of(lambda: list(embed.EmbedStream(iter(requests))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_it_fills_the_metadata(embed: tei_pb2_grpc.EmbedStub) -> None:
    metadata = embed.Embed(tei_pb2.EmbedRequest(inputs="hello world")).metadata
    assert metadata.compute_chars == len("hello world")
    assert metadata.compute_tokens == 4
    assert metadata.inference_time_ns > 0 and metadata.tokenization_time_ns > 0
    assert metadata.total_time_ns >= metadata.inference_time_ns + metadata.queue_time_ns


def test_it_tokenizes_like_the_hugging_face_tokenizer(
    channel: grpc.Channel, reference: Reference
) -> None:
    stub = tei_pb2_grpc.TokenizeStub(channel)
    text = "Héllo, wörld! Tokenizers split unbelievably"
    response = stub.Tokenize(tei_pb2.EncodeRequest(inputs=text, add_special_tokens=True))
    assert [t.id for t in response.tokens] == reference.tokenizer(text)["input_ids"]
    first, last = response.tokens[0], response.tokens[-1]
    assert (first.text, first.special, first.HasField("start")) == ("[CLS]", True, False)
    assert (last.text, last.special) == ("[SEP]", True)
    for token in response.tokens[1:-1]:
        assert not token.special
        assert token.text == text[token.start : token.stop]
    bare = stub.Tokenize(tei_pb2.EncodeRequest(inputs=text, add_special_tokens=False))
    assert [t.id for t in bare.tokens] == [t.id for t in response.tokens[1:-1]]
    prompted = stub.Tokenize(tei_pb2.EncodeRequest(inputs="x", prompt_name="query"))
    assert [t.text for t in prompted.tokens] == ["query", ":", "x"]
    streamed = list(stub.TokenizeStream(iter([tei_pb2.EncodeRequest(inputs=t) for t in TEXTS])))
    assert len(streamed) == len(TEXTS)


def test_it_decodes_token_ids(channel: grpc.Channel, reference: Reference) -> None:
    stub = tei_pb2_grpc.TokenizeStub(channel)
    ids = reference.tokenizer("hello world")["input_ids"]
    assert stub.Decode(tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=True)).text == (
        "hello world"
    )
    assert stub.Decode(tei_pb2.DecodeRequest(ids=ids)).text == "[CLS] hello world [SEP]"
    streamed = list(stub.DecodeStream(iter([tei_pb2.DecodeRequest(ids=ids)] * 3)))
    assert len(streamed) == 3


def test_it_refuses_what_an_embedding_model_cannot_do(
    channel: grpc.Channel, embed: tei_pb2_grpc.EmbedStub
) -> None:
    calls = [
        lambda: tei_pb2_grpc.RerankStub(channel).Rerank(
            tei_pb2.RerankRequest(query="q", texts=["a"])
        ),
        lambda: tei_pb2_grpc.RerankStub(channel).RerankStream(
            iter([tei_pb2.RerankStreamRequest(query="q", text="a")])
        ),
        lambda: tei_pb2_grpc.PredictStub(channel).Predict(tei_pb2.PredictRequest(inputs="a")),
        lambda: embed.EmbedSparse(tei_pb2.EmbedSparseRequest(inputs="a")),
    ]
    for call in calls:
        code, details = status_of(call)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "model is not" in details


def test_it_reports_its_info(channel: grpc.Channel) -> None:
    info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest())
    assert info.model_id == REPO_ID
    assert info.model_type == tei_pb2.MODEL_TYPE_EMBEDDING
    assert info.model_dtype == "float32"
    assert info.max_input_length == 256  # sentence_bert_config.json, as TEI reads it
    assert (info.max_batch_tokens, info.max_concurrent_requests) == (16384, 64)
    assert info.max_client_batch_size == 32
    assert not info.HasField("max_batch_requests")
    assert info.model_sha  # the snapshot's commit, from the cache layout


def test_32_concurrent_clients_each_get_their_own_embedding(
    server: LocalTEI, reference: Reference
) -> None:
    texts = [f"Sentence number {i} talks about topic {i * 7 % 13}." for i in range(32)]
    expected = reference.embed(texts)

    def one(text: str) -> list[float]:
        with server.channel() as own:
            return list(
                tei_pb2_grpc.EmbedStub(own).Embed(tei_pb2.EmbedRequest(inputs=text)).embeddings
            )

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, texts))
    assert min(cosine(g, e) for g, e in zip(got, expected, strict=True)) >= 0.999


def test_health_went_from_not_serving_to_serving_per_service(
    server: LocalTEI, channel: grpc.Channel
) -> None:
    seen = [s for s in server.health_seen if s != "UNAVAILABLE"]  # before the port opened
    # A model loaded from the ONNX cache can be SERVING before the first poll sees
    # NOT_SERVING (test_localtei_cli waits for that phase with a slower load).
    assert seen in (["NOT_SERVING", "SERVING"], ["SERVING"])
    stub = health_pb2_grpc.HealthStub(channel)

    def status(service: str) -> str:
        response = stub.Check(health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    assert {
        name: status(name) for name in ("", "tei.v1.Embed", "tei.v1.Info", "tei.v1.Tokenize")
    } == {
        "": "SERVING",
        "tei.v1.Embed": "SERVING",
        "tei.v1.Info": "SERVING",
        "tei.v1.Tokenize": "SERVING",
    }
    assert status("tei.v1.Rerank") == status("tei.v1.Predict") == "NOT_SERVING"


def test_reflection_lists_every_service(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    (response,) = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {service.name for service in response.list_services_response.service}
    assert {
        "tei.v1.Info",
        "tei.v1.Embed",
        "tei.v1.Predict",
        "tei.v1.Rerank",
        "tei.v1.Tokenize",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_it_serves_prometheus_metrics(server: LocalTEI, embed: tei_pb2_grpc.EmbedStub) -> None:
    embed.Embed(tei_pb2.EmbedRequest(inputs="count me"))
    url = f"http://127.0.0.1:{server.prometheus_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    for name in (
        'te_request_count_total{method="embed"}',
        "te_request_success_total",
        'te_request_failure_total{err="validation"}',
        "te_request_duration_bucket",
        "te_queue_size",
        "te_batch_next_size_bucket",
        "te_batch_inference_duration_bucket",
        "te_embed_count_total",
    ):
        assert name in body


def test_json_output_writes_one_json_object_per_line(server: LocalTEI) -> None:
    lines = [line for line in server.log_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    assert all({"timestamp", "level", "message", "target"} <= set(r) for r in records)
    assert "Ready" in [r["message"] for r in records]
