"""The HTTP data plane end to end: real localtei instances behind a real multiplexer, called
over HTTP by TEI's and OpenAI's own client libraries and by plain requests; every answer
is compared with the same call made directly to the instance over gRPC."""

from __future__ import annotations

import base64
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tei.v1 import tei_pb2

from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.http_client import add_row, request
from tests.localtei_fixtures import MINILM_ID, LocalTEI, build_tiny_model, launch_localtei
from tests.test_multiplexer import direct, wait_for_table

pytestmark = pytest.mark.django_db(transaction=True)

RERANKER_ID, CLASSIFIER_ID, SPLADE_ID = "tiny/reranker", "tiny/classifier", "tiny/splade"
TEXTS = ["The quick brown fox", "jumps over", "the lazy dog", "again and again"]


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalTEI]]:
    models = tmp_path_factory.mktemp("models")
    started = {
        "minilm": launch_localtei(MINILM_ID),
        "splade": launch_localtei(build_tiny_model("splade", models / "s"), "--pooling", "splade"),
        "reranker": launch_localtei(build_tiny_model("reranker", models / "r")),
        "classifier": launch_localtei(build_tiny_model("classifier", models / "c")),
    }
    try:
        for server in started.values():
            server.wait_until_serving()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, http_payload_limit_bytes=100_000)
    with BackgroundMultiplexer(options) as background:
        yield background


@pytest.fixture
def base(multiplexer: BackgroundMultiplexer, servers: dict[str, LocalTEI]) -> str:
    """The HTTP data plane's URL, with one running Instance row per server."""
    model_ids = {
        "minilm": MINILM_ID,
        "splade": SPLADE_ID,
        "reranker": RERANKER_ID,
        "classifier": CLASSIFIER_ID,
    }
    for name, server in servers.items():
        pooling = "splade" if name == "splade" else ""
        add_row(name, model_ids[name], server.port, pooling=pooling)
    add_row("stopped-one", "stopped/model", 1, status="stopped")
    wait_for_table(multiplexer, {**{n: "running" for n in servers}, "stopped-one": "stopped"})
    return f"http://127.0.0.1:{multiplexer.server.http_port}"  # type: ignore[union-attr]


def assert_same_vectors(got: Any, want: Any) -> None:
    """Equal up to float noise: texts the instance batches together differ in the last bits."""
    np.testing.assert_allclose(np.asarray(got, dtype=np.float32), want, rtol=1e-4, atol=1e-6)


def embedding(server: LocalTEI, text: str, **fields: Any) -> np.ndarray:
    reply = direct(server, "Embed", tei_pb2.EmbedRequest(inputs=text, **fields))
    return np.asarray(reply.embeddings, dtype=np.float32)


# TEI's API per target -------------------------------------------------------------------


def test_huggingface_s_inference_client_works_unchanged(
    base: str, servers: dict[str, LocalTEI], monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import InferenceClient, constants

    # The suite runs with HF_HUB_OFFLINE=1 (no hub downloads); this client talks to the
    # multiplexer on loopback, which offline mode would refuse as well.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    client = InferenceClient(model=f"{base}/instances/minilm")
    got = client.feature_extraction("The quick brown fox")
    np.testing.assert_array_equal(got, [embedding(servers["minilm"], "The quick brown fox")])
    many = client.feature_extraction(TEXTS)
    want = np.stack([embedding(servers["minilm"], text) for text in TEXTS])
    assert_same_vectors(many, want)


def test_embed_answers_tei_s_json_and_timing_headers(
    base: str, servers: dict[str, LocalTEI]
) -> None:
    want = np.stack([embedding(servers["minilm"], text) for text in TEXTS])
    for url in (
        f"{base}/instances/minilm/embed",
        f"{base}/instances/minilm",
        f"{base}/instances/minilm/",
        f"{base}/instances/minilm/invocations",
        f"{base}/models/{MINILM_ID}/embed",
        f"{base}/models/{MINILM_ID}",
    ):
        reply = request(url, {"inputs": TEXTS})
        assert reply.status == 200, (url, reply.json)
        assert_same_vectors(reply.json, want)
    one = request(f"{base}/instances/minilm/embed", {"inputs": TEXTS[0], "normalize": False})
    np.testing.assert_array_equal(
        np.asarray(one.json, dtype=np.float32),
        [embedding(servers["minilm"], TEXTS[0], normalize=False)],
    )
    for header in ("x-compute-characters", "x-compute-tokens", "x-total-time", "x-compute-time",
                   "x-tokenization-time", "x-queue-time", "x-inference-time"):  # fmt: skip
        assert one.headers[header].isdigit(), header
    assert int(one.headers["x-compute-characters"]) == len(TEXTS[0])
    assert int(one.headers["x-compute-tokens"]) == 6  # [CLS] the quick brown fox [SEP]
    short = request(f"{base}/instances/minilm/embed", {"inputs": "a b", "dimensions": 8})
    assert len(short.json[0]) == 8


def test_it_serves_every_tei_route(base: str, servers: dict[str, LocalTEI]) -> None:
    minilm, splade = f"{base}/instances/minilm", f"{base}/instances/splade"

    tokens = request(f"{minilm}/embed_all", {"inputs": ["hello world"]}).json
    want = direct(servers["minilm"], "EmbedAll", tei_pb2.EmbedAllRequest(inputs="hello world"))
    assert_same_vectors(tokens[0], [t.embeddings for t in want.token_embeddings])

    want_sparse = direct(servers["splade"], "EmbedSparse", tei_pb2.EmbedSparseRequest(inputs="x y"))
    for url in (f"{splade}/embed_sparse", splade, f"{splade}/invocations"):
        sparse = request(url, {"inputs": "x y"}).json
        assert [v["index"] for v in sparse[0]] == [v.index for v in want_sparse.sparse_embeddings]

    tokenized = request(f"{minilm}/tokenize", {"inputs": ["Hello world", "Hi"]}).json
    want_tokens = direct(
        servers["minilm"],
        "Tokenize",
        tei_pb2.EncodeRequest(inputs="Hello world", add_special_tokens=True),
    )
    assert [(t["id"], t["text"], t["special"]) for t in tokenized[0]] == [
        (t.id, t.text, t.special) for t in want_tokens.tokens
    ]
    assert tokenized[0][1] == {"id": 7592, "text": "Hello", "special": False, "start": 0, "stop": 5}
    assert tokenized[0][0]["start"] is None and len(tokenized) == 2
    assert request(f"{minilm}/decode", {"ids": [101, 7592, 2088, 102]}).json == ["hello world"]
    assert request(f"{minilm}/decode", {"ids": [[7592], [2088]]}).json == ["hello", "world"]

    similarity = request(
        f"{minilm}/similarity",
        {"inputs": {"source_sentence": "a cat", "sentences": ["a cat", "quantum chromodynamics"]}},
    ).json
    assert similarity[0] == pytest.approx(1.0, abs=1e-5) and similarity[1] < 0.5

    info = request(f"{minilm}/info").json
    assert info["model_id"] == MINILM_ID and info["model_type"] == {"embedding": {"pooling": ""}}
    assert (info["max_concurrent_requests"], info["max_client_batch_size"]) == (512, 2048)
    assert request(f"{minilm}/health").status == 200
    assert request(minilm).status == 200  # TEI answers GET / as a health check


def test_it_serves_predict_and_rerank(base: str, servers: dict[str, LocalTEI]) -> None:
    classifier, reranker = f"{base}/instances/classifier", f"{base}/instances/reranker"
    want = direct(servers["classifier"], "Predict", tei_pb2.PredictRequest(inputs="nice"))
    want_labels = [p.label for p in want.predictions]
    for url in (f"{classifier}/predict", classifier, f"{classifier}/invocations"):
        single = request(url, {"inputs": "nice"}).json
        assert [p["label"] for p in single] == want_labels
        assert single[0]["score"] == pytest.approx(want.predictions[0].score, rel=1e-5)
    pair = request(f"{classifier}/predict", {"inputs": ["a question", "an answer"]}).json
    assert {p["label"] for p in pair} == set(want_labels)
    batch = request(f"{classifier}/predict", {"inputs": [["nice"], ["q", "a"], ["x"]]}).json
    assert len(batch) == 3 and [p["label"] for p in batch[0]] == want_labels

    texts = ["one", "two words", "three"]
    want_ranks = direct(
        servers["reranker"],
        "Rerank",
        tei_pb2.RerankRequest(query="what", texts=texts, return_text=True),
    ).ranks
    for url in (f"{reranker}/rerank", reranker, f"{reranker}/invocations"):
        ranks = request(url, {"query": "what", "texts": texts, "return_text": True}).json
        assert [(r["index"], r["text"]) for r in ranks] == [(r.index, r.text) for r in want_ranks]
        assert [r["score"] for r in ranks] == pytest.approx([r.score for r in want_ranks])
    plain = request(f"{reranker}/rerank", {"query": "what", "texts": texts}).json
    assert "text" not in plain[0]


# OpenAI-compatible API ------------------------------------------------------------------


def test_the_openai_sdk_embeds_one_and_a_hundred_texts(
    base: str, servers: dict[str, LocalTEI]
) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-checked", max_retries=0)
    texts = [f"text number {i} about {TEXTS[i % 4]}" for i in range(100)]
    want = np.stack([embedding(servers["minilm"], text) for text in texts])
    # The SDK asks for base64 and decodes it itself unless told a format.
    formats: list[Any] = [openai.NOT_GIVEN, "float", "base64"]
    for model in ("minilm", MINILM_ID):
        for encoding_format in formats:
            one = client.embeddings.create(
                model=model, input=texts[0], encoding_format=encoding_format
            )
            assert one.model == model and one.usage.prompt_tokens > 0
            many = client.embeddings.create(
                model=model, input=texts, encoding_format=encoding_format
            )
            assert [d.index for d in many.data] == list(range(100))
            vectors = [_floats(d.embedding) for d in many.data]
            np.testing.assert_array_equal(_floats(one.data[0].embedding), want[0])
            assert_same_vectors(vectors, want)
    assert many.usage.total_tokens == sum(
        direct(servers["minilm"], "Embed", tei_pb2.EmbedRequest(inputs=t)).metadata.compute_tokens
        for t in texts
    )


def _floats(embedding: Any) -> np.ndarray:
    if isinstance(embedding, str):  # base64 of little-endian float32
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def test_openai_embeddings_take_token_ids_and_encode_base64_little_endian(
    base: str, servers: dict[str, LocalTEI]
) -> None:
    ids = [7592, 2088]  # "hello world"
    want = embedding(servers["minilm"], "hello world")
    for payload in (ids, [ids, "hello world"]):
        reply = request(f"{base}/v1/embeddings", {"model": "minilm", "input": payload}).json
        for item in reply["data"]:
            assert_same_vectors(item["embedding"], want)
    reply = request(
        f"{base}/v1/embeddings",
        {"model": "minilm", "input": "hello world", "encoding_format": "base64", "user": "u"},
    ).json
    decoded = np.frombuffer(base64.b64decode(reply["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, want)
    target = request(f"{base}/instances/minilm/v1/embeddings", {"input": "hello world"}).json
    assert target["model"] == MINILM_ID and target["object"] == "list"


def test_it_lists_what_is_routable_in_openai_s_shape(base: str) -> None:
    listed = request(f"{base}/v1/models").json
    ids = [m["id"] for m in listed["data"]]
    assert listed["object"] == "list"
    assert {"minilm", "splade", MINILM_ID, RERANKER_ID} <= set(ids)
    assert "stopped-one" not in ids and "stopped/model" not in ids
    assert request(f"{base}/v1/models/{MINILM_ID}").json["id"] == MINILM_ID
    assert request(f"{base}/v1/models/minilm").json["object"] == "model"
    assert request(f"{base}/v1/models/nope").status == 404
    assert request(f"{base}/v1/models/stopped-one").status == 503


def test_v1_rerank_answers_cohere_s_shape(base: str, servers: dict[str, LocalTEI]) -> None:
    documents = ["one", "two words", "three"]
    want = direct(
        servers["reranker"], "Rerank", tei_pb2.RerankRequest(query="what", texts=documents)
    ).ranks
    reply = request(
        f"{base}/v1/rerank",
        {"model": RERANKER_ID, "query": "what", "documents": documents, "top_n": 2},
    ).json
    assert [r["index"] for r in reply["results"]] == [r.index for r in want[:2]]
    assert [r["relevance_score"] for r in reply["results"]] == pytest.approx(
        [r.score for r in want[:2]]
    )
    assert reply["results"][0]["document"] == {"text": documents[want[0].index]}
    bare = request(
        f"{base}/v1/rerank",
        {
            "model": "reranker",
            "query": "what",
            "documents": [{"text": d} for d in documents],
            "return_documents": False,
        },
    ).json
    assert len(bare["results"]) == 3 and "document" not in bare["results"][0]


# Errors ---------------------------------------------------------------------------------

TEI_ERRORS = [
    # (path, body or raw bytes, status, error_type, words in the message)
    ("instances/minilm/embed", {"inputs": 5}, 422, "Validation", "inputs"),
    ("instances/minilm/embed", {"inputs": "x", "normalize": "yes"}, 422, "Validation", "normalize"),
    ("instances/minilm/embed", b'{"inputs": "x"', 422, "Validation", "JSON"),
    ("instances/minilm/embed", b"", 422, "Validation", ""),
    ("instances/minilm/embed", {"inputs": []}, 400, "Empty", "cannot be empty"),
    ("instances/minilm/embed", {"inputs": ""}, 400, "Empty", "cannot be empty"),
    ("instances/minilm/embed", {"inputs": ["a"] * 2049}, 422, "Validation", "batch size 2049"),
    ("instances/minilm/embed", {"inputs": "x", "dimensions": 999}, 422, "Validation", "dimension"),
    ("instances/minilm/rerank", {"query": "q", "texts": ["a"]}, 424, "Backend", "re-ranker"),
    ("instances/minilm/rerank", {"query": "q", "texts": []}, 400, "Empty", "`texts`"),
    ("instances/minilm/predict", {"inputs": [["a", "b", "c"]]}, 422, "Validation", "pair"),
    ("instances/nope/embed", {"inputs": "x"}, 404, "NotFound", "instance 'nope' not found"),
    ("models/no/such-model/embed", {"inputs": "x"}, 404, "NotFound", "no instance serves"),
    ("instances/stopped-one/embed", {"inputs": "x"}, 503, "Unhealthy", "not running"),
    ("instances/minilm/embed", {"inputs": "x" * 150_000}, 413, "Validation", "100000"),
]


@pytest.mark.parametrize(("path", "body", "status", "error_type", "words"), TEI_ERRORS)
def test_it_answers_tei_s_errors(
    base: str, path: str, body: Any, status: int, error_type: str, words: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    reply = request(f"{base}/{path}", None if raw is not None else body, raw=raw)
    assert (reply.status, reply.json["error_type"]) == (status, error_type), reply.json
    assert words in reply.json["error"]


OPENAI_ERRORS = [
    ({"model": "minilm", "input": 3}, 400, "invalid_request_error", "input"),
    (b"{not json", 400, "invalid_request_error", None),
    ({"input": "x"}, 400, "invalid_request_error", "model"),
    ({"model": "minilm", "input": []}, 400, "invalid_request_error", "input"),
    ({"model": "nope", "input": "x"}, 404, "invalid_request_error", None),
    ({"model": "stopped-one", "input": "x"}, 503, "server_error", None),
    ({"model": "minilm", "input": "x" * 150_000}, 413, "invalid_request_error", None),
    ({"model": "reranker", "input": "x"}, 400, "invalid_request_error", None),
]


@pytest.mark.parametrize(("body", "status", "kind", "param"), OPENAI_ERRORS)
def test_it_answers_openai_s_errors(
    base: str, body: Any, status: int, kind: str, param: str | None
) -> None:
    raw = body if isinstance(body, bytes) else None
    reply = request(f"{base}/v1/embeddings", None if raw is not None else body, raw=raw)
    assert reply.status == status, reply.json
    error = reply.json["error"]
    assert error["type"] == kind and error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param


def test_the_openai_sdk_raises_its_own_errors(base: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="minilm", input=[])


def test_unknown_paths_and_methods_answer_json(base: str) -> None:
    missing = request(f"{base}/nothing/here")
    assert missing.status == 404 and missing.json["error_type"] == "NotFound"
    wrong = request(f"{base}/v1/embeddings", method="GET")
    assert wrong.status == 405 and wrong.json["error"]["type"] == "invalid_request_error"


# Cancellation, docs, metrics ------------------------------------------------------------


@pytest.fixture
def silent_instance() -> Iterator[tuple[int, threading.Event, threading.Event]]:
    """A gRPC instance whose Embed never answers; the events are set once a call has
    reached it and once a call is cancelled."""
    from concurrent import futures

    received, cancelled, release = threading.Event(), threading.Event(), threading.Event()

    def hang(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.add_callback(cancelled.set)
        received.set()
        release.wait(30)
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(hang)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tei.v1.Embed", {"Embed": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, received, cancelled
    release.set()
    server.stop(0)


def test_a_client_that_disconnects_cancels_its_call(
    base: str,
    multiplexer: BackgroundMultiplexer,
    silent_instance: tuple[int, threading.Event, threading.Event],
) -> None:
    port, received, cancelled = silent_instance
    add_row("silent", "silent/model", port)
    router = multiplexer.server.router  # type: ignore[union-attr]
    deadline = time.monotonic() + 5
    while "silent" not in router.table.by_name:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    body = b'{"inputs": "x"}'
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1]))) as client:
        client.sendall(
            b"POST /instances/silent/embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        # Disconnect only once the instance holds the call: there is a call to cancel.
        assert received.wait(10), "the call never reached the instance"
        assert router.in_flight("silent") == 1
    assert cancelled.wait(10), "the instance's call was not cancelled"
    deadline = time.monotonic() + 10
    while router.in_flight("silent") != 0:
        assert time.monotonic() < deadline, "the admission slot was not given back"
        time.sleep(0.02)


def test_it_serves_its_openapi_document_and_docs_page_from_its_own_port(base: str) -> None:
    document = request(f"{base}/openapi.json").json
    assert document["openapi"].startswith("3.")
    for path in ("/v1/embeddings", "/v1/rerank", "/instances/{name}/embed",
                 "/models/{model_id}/rerank", "/instances/{name}/v1/embeddings"):  # fmt: skip
        assert path in document["paths"], path
    assert "EmbedRequest" in document["components"]["schemas"]
    page = request(f"{base}/docs")
    assert page.status == 200 and b"/docs/assets/swagger-ui-bundle.js" in page.raw
    assert b"http" not in page.raw.split(b"<body>")[1].replace(b"/openapi.json", b"")
    asset = request(f"{base}/docs/assets/swagger-ui-bundle.js")
    assert asset.status == 200 and len(asset.raw) > 100_000


def test_it_counts_http_requests_and_latency_per_route_and_instance(base: str) -> None:
    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    route = "/instances/{name}/embed"
    ok = {"instance": "minilm", "route": route, "status": "200"}
    bad = {"instance": "minilm", "route": route, "status": "400"}
    latency = {"instance": "minilm", "route": route}
    before = (
        sample("tei_manager_multiplexer_http_requests_total", **ok),
        sample("tei_manager_multiplexer_http_requests_total", **bad),
        sample("tei_manager_multiplexer_http_request_duration_seconds_count", **latency),
    )
    request(f"{base}/instances/minilm/embed", {"inputs": "a"})
    request(f"{base}/instances/minilm/embed", {"inputs": []})
    after = (
        sample("tei_manager_multiplexer_http_requests_total", **ok),
        sample("tei_manager_multiplexer_http_requests_total", **bad),
        sample("tei_manager_multiplexer_http_request_duration_seconds_count", **latency),
    )
    assert after == (before[0] + 1, before[1] + 1, before[2] + 2)
    unrouted = {"instance": "-", "route": "/v1/embeddings", "status": "404"}
    count = sample("tei_manager_multiplexer_http_requests_total", **unrouted)
    request(f"{base}/v1/embeddings", {"model": "nope", "input": "x"})
    assert sample("tei_manager_multiplexer_http_requests_total", **unrouted) == count + 1


def test_model_ids_may_come_percent_encoded(base: str, servers: dict[str, LocalTEI]) -> None:
    encoded = MINILM_ID.replace("/", "%2F")
    reply = request(f"{base}/models/{encoded}/embed", {"inputs": "hello"})
    assert reply.status == 200, reply.json
    np.testing.assert_array_equal(
        np.asarray(reply.json, dtype=np.float32), [embedding(servers["minilm"], "hello")]
    )


def test_runmultiplexer_serves_http_and_names_a_taken_port(
    base: str, tmp_path: Any, settings: Any
) -> None:
    """`make run`'s multiplexer: HTTP beside gRPC, its HTTP and queue series in the control
    plane's scrape (PROMETHEUS_MULTIPROC_DIR), a clear message when the port is taken."""
    import signal

    from instances.metrics import render
    from tests.http_client import HoldingInstance
    from tests.localtei_fixtures import free_port
    from tests.test_multiplexer import read_until, start_command

    holding = HoldingInstance()
    add_row("held", "held/model", holding.port, max_concurrent_requests=1)
    http_port = free_port()
    url = f"http://127.0.0.1:{http_port}"
    process = start_command("--port", str(free_port()), "--metrics-port", "0",
                            "--http-port", str(http_port), PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
                            TEI_MANAGER_QUEUE_SIZE="0")  # fmt: skip
    try:
        assert f"HTTP on port {http_port}" in read_until(process, "is now running")
        reply = request(f"{url}/instances/minilm/embed", {"inputs": "a"})
        assert reply.status == 200 and len(reply.json[0]) == 384
        held = threading.Thread(
            target=request, args=(f"{url}/instances/held/embed", {"inputs": "x"})
        )
        held.start()
        deadline = time.monotonic() + 10
        while holding.seen == 0:
            assert time.monotonic() < deadline, "the held call never arrived"
            time.sleep(0.02)
        refused = request(f"{url}/instances/held/embed", {"inputs": "x"})  # queue_size 0
        assert refused.status == 429
        holding.release()
        held.join(10)

        taken = start_command("--port", str(free_port()), "--metrics-port", "0",
                              "--http-port", str(http_port))  # fmt: skip
        output, _ = taken.communicate(timeout=60)
        assert taken.returncode != 0
        assert f"{http_port} (HTTP, TEI_MANAGER_HTTP_PORT)" in output
        assert "Traceback" not in output
    finally:
        holding.release()
        holding.server.stop(0)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and output.rstrip().endswith("Done.")
    settings.TEI = dataclasses.replace(settings.TEI, prometheus_multiproc_dir=str(tmp_path))
    scrape = render()[0].decode()
    http = "tei_manager_multiplexer_http_requests_total"
    assert (
        f'{http}{{instance="minilm",route="/instances/{{name}}/embed",status="200"}} 1.0' in scrape
    )
    assert f'{http}{{instance="held",route="/instances/{{name}}/embed",status="429"}} 1.0' in scrape
    refusals = "tei_manager_multiplexer_queue_refused_total"
    assert f'{refusals}{{instance="held",reason="queue_full"}} 1.0' in scrape
