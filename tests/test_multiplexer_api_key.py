"""An instance started with `--api-key`: the key is checked by localtei, and the
multiplexer passes the client's `authorization` header on for every kind of call, gRPC
metadata and HTTP header alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pyarrow as pa
import pytest
from tei.v1 import tei_pb2, tei_pb2_grpc
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from multiplexer.benchclient import text_batch
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.http_client import request
from tests.localtei_fixtures import MINILM_ID, LocalTEI, start_localtei
from tests.test_multiplexer import add_instance, rpc_error

pytestmark = pytest.mark.django_db(transaction=True)

KEY = "s3cret-key"
GOOD = (("authorization", f"Bearer {KEY}"),)
WRONG = (("authorization", "Bearer guess"),)
TEXTS = ["a locked instance", "still answers its owner"]


@pytest.fixture(scope="module")
def locked() -> Iterator[LocalTEI]:
    with start_localtei(MINILM_ID, "--api-key", KEY) as server:
        yield server


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    with BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0, http_port=0)) as background:
        yield background


@pytest.fixture
def stub(locked: LocalTEI, multiplexer: BackgroundMultiplexer) -> Iterator[Any]:
    add_instance(multiplexer, {}, "locked", locked.port)
    with grpc.insecure_channel(f"127.0.0.1:{multiplexer.server.port}") as channel:  # type: ignore[union-attr]
        yield multiplexer_pb2_grpc.TeiMultiplexerStub(channel)


def embed(text: str) -> mux.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name="locked"), request=tei_pb2.EmbedRequest(inputs=text)
    )


def test_localtei_refuses_a_call_without_the_key(locked: LocalTEI) -> None:
    with locked.channel() as channel:
        direct = tei_pb2_grpc.EmbedStub(channel)
        for metadata in (None, WRONG):
            error = rpc_error(
                lambda m=metadata: direct.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=m)
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "API key" in (error.details() or "")
        assert len(direct.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=GOOD).embeddings) == 384


def test_the_multiplexer_passes_the_key_on_for_unary_calls_and_streams(
    stub: Any, locked: LocalTEI
) -> None:
    with locked.channel() as channel:
        direct = tei_pb2_grpc.EmbedStub(channel)
        expected = [
            list(direct.Embed(tei_pb2.EmbedRequest(inputs=t), metadata=GOOD).embeddings)
            for t in TEXTS
        ]
    assert list(stub.Embed(embed(TEXTS[0]), metadata=GOOD).embeddings) == expected[0]
    streamed = stub.EmbedStream(iter([embed(t) for t in TEXTS]), metadata=GOOD)
    assert [list(reply.embeddings) for reply in streamed] == expected

    for metadata in (None, WRONG):
        error = rpc_error(lambda m=metadata: stub.Embed(embed("x"), metadata=m))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        error = rpc_error(lambda m=metadata: stub.EmbedStream(iter([embed("x")]), metadata=m))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_multiplexer_passes_the_key_on_for_arrow_batches(stub: Any) -> None:
    request = mux.EmbedArrowRequest(
        target=mux.Target(instance_name="locked"), arrow_ipc=text_batch(TEXTS)
    )
    reply = stub.EmbedArrow(request, metadata=GOOD)
    table = pa.ipc.open_stream(pa.py_buffer(reply.arrow_ipc)).read_all()
    assert table.num_rows == len(TEXTS)
    error = rpc_error(lambda: stub.EmbedArrow(request))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_http_data_plane_passes_the_authorization_header_on(
    stub: Any, multiplexer: BackgroundMultiplexer
) -> None:
    import openai

    base = f"http://127.0.0.1:{multiplexer.server.http_port}"  # type: ignore[union-attr]
    owner = {"Authorization": f"Bearer {KEY}"}
    answered = request(f"{base}/instances/locked/embed", {"inputs": TEXTS}, headers=owner)
    assert answered.status == 200 and len(answered.json) == 2
    for headers in (None, {"Authorization": "Bearer guess"}):
        refused = request(f"{base}/instances/locked/embed", {"inputs": "x"}, headers=headers)
        assert (refused.status, refused.json["error_type"]) == (401, "Unauthorized")

    # The OpenAI SDK sends its api_key as that bearer token.
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
    assert len(client.embeddings.create(model="locked", input="x").data[0].embedding) == 384
    stranger = openai.OpenAI(base_url=f"{base}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.embeddings.create(model="locked", input="x")
