"""The data plane behind keys, end to end: a real localtei that holds its own key (API_KEY),
the multiplexer on loopback with its gRPC and HTTP servers, and keys made as an operator
makes them (access/keys.py).

- The instance refuses a call without its key; the multiplexer sends the key, never the
  client's own credentials.
- Every refusal: a missing or invalid key, the wrong scope, a target outside the key's
  list, the rate limit; over gRPC (unary, streams, Arrow) and HTTP (TEI's and OpenAI's
  shapes); /v1/models lists what the key may use; a revoked key stops within a second.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest
from tei.v1 import tei_pb2, tei_pb2_grpc
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from access import keys
from multiplexer.benchclient import text_batch
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.http_client import add_row, request
from tests.localtei_fixtures import MINILM_ID, LocalTEI, localtei_env, start_localtei
from tests.test_multiplexer import rpc_error, wait_for_read

pytestmark = pytest.mark.django_db(transaction=True)

INSTANCE_KEY = "the-instance-key-only-the-manager-knows"
OTHER_MODEL = "other/model"


@pytest.fixture(scope="module")
def locked() -> Iterator[LocalTEI]:
    with start_localtei(MINILM_ID, env=localtei_env(API_KEY=INSTANCE_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, refresh_interval_secs=0.2)
    with BackgroundMultiplexer(options) as background:
        yield background


@pytest.fixture
def fleet(locked: LocalTEI, multiplexer: BackgroundMultiplexer) -> BackgroundMultiplexer:
    """Two rows on the one server: `minilm` and `other` (another model id)."""
    add_row("minilm", MINILM_ID, locked.port, api_key=INSTANCE_KEY, node="keys-tests")
    add_row("other", OTHER_MODEL, locked.port, api_key=INSTANCE_KEY, node="keys-tests-b")
    wait_for_read(
        multiplexer, lambda table: {"minilm", "other"} <= set(table.by_name), "both routable"
    )
    return multiplexer


@pytest.fixture
def stub(fleet: BackgroundMultiplexer) -> Iterator[Any]:
    with grpc.insecure_channel(f"127.0.0.1:{server(fleet).port}") as channel:
        yield multiplexer_pb2_grpc.TeiMultiplexerStub(channel)


def server(background: BackgroundMultiplexer) -> Any:
    assert background.server is not None
    return background.server


def wait(predicate: Any, timeout: float = 10.0) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - started


def make_key(background: BackgroundMultiplexer, name: str, *scopes: str, **fields: Any) -> str:
    """A key, once the multiplexer's table holds it."""
    secret = keys.create_key(name, scopes or ["inference"], **fields).secret
    keyring = server(background).keyring
    wait(lambda: any(e.name == name for e in keyring.table.by_prefix.values()))
    return secret


def auth(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


def embed(name: str = "minilm", text: str = "hello") -> mux.EmbedRequest:
    return mux.EmbedRequest(
        target=mux.Target(instance_name=name), request=tei_pb2.EmbedRequest(inputs=text)
    )


def http(background: BackgroundMultiplexer, path: str) -> str:
    return f"http://127.0.0.1:{server(background).http_port}{path}"


def test_the_instance_refuses_a_call_without_its_own_key(locked: LocalTEI) -> None:
    with locked.channel() as channel:
        direct = tei_pb2_grpc.EmbedStub(channel)
        for metadata in (None, auth("guess")):
            error = rpc_error(
                lambda m=metadata: direct.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=m)
            )
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = direct.Embed(tei_pb2.EmbedRequest(inputs="x"), metadata=auth(INSTANCE_KEY))
        assert len(reply.embeddings) == 384


def test_an_open_fleet_answers_without_a_key_and_the_instance_gets_its_own(
    stub: Any, fleet: BackgroundMultiplexer
) -> None:
    # The client's credentials (the OpenAI SDK always sends some) never reach the instance,
    # which would refuse them: it gets its own key from the multiplexer.
    for metadata in (None, auth("whatever"), (("x-api-key", "whatever"),)):
        assert len(stub.Embed(embed(), metadata=metadata).embeddings) == 384
    streamed = stub.EmbedStream(iter([embed(text="a"), embed(text="b")]), metadata=auth("x"))
    assert len(list(streamed)) == 2
    arrow = mux.EmbedArrowRequest(
        target=mux.Target(model_id=MINILM_ID), arrow_ipc=text_batch(["a"])
    )
    assert stub.EmbedArrow(arrow).arrow_ipc
    answered = request(http(fleet, "/instances/minilm/embed"), {"inputs": ["a", "b"]})
    assert answered.status == 200 and len(answered.json) == 2
    info = request(http(fleet, "/instances/minilm/info"), headers={"Authorization": "Bearer x"})
    assert info.status == 200 and info.json["model_id"] == MINILM_ID


def test_grpc_refuses_a_missing_invalid_or_unscoped_key(
    stub: Any, fleet: BackgroundMultiplexer
) -> None:
    app = make_key(fleet, "app", "inference")
    ops = make_key(fleet, "ops", "admin")
    info = mux.InfoRequest(target=mux.Target(instance_name="minilm"))
    arrow = mux.EmbedArrowRequest(
        target=mux.Target(instance_name="minilm"), arrow_ipc=text_batch(["a"])
    )
    calls = {
        "Embed": lambda m: stub.Embed(embed(), metadata=m),
        "Info": lambda m: stub.Info(info, metadata=m),
        "EmbedStream": lambda m: stub.EmbedStream(iter([embed()]), metadata=m),
        "EmbedArrow": lambda m: stub.EmbedArrow(arrow, metadata=m),
    }
    for method, call in calls.items():
        for metadata, code, says in (
            (None, grpc.StatusCode.UNAUTHENTICATED, "an API key is required"),
            (auth("nope.nope"), grpc.StatusCode.UNAUTHENTICATED, "invalid API key"),
            (auth(ops), grpc.StatusCode.PERMISSION_DENIED, "API key 'ops' has no inference scope"),
        ):
            error = rpc_error(lambda c=call, m=metadata: c(m))
            assert error.code() == code and error.details().startswith(says), method
        call(auth(app))
        call((("x-api-key", app),))
    assert len(stub.Embed(embed(), metadata=auth(app)).embeddings) == 384


def test_a_key_limited_to_targets_uses_only_them(stub: Any, fleet: BackgroundMultiplexer) -> None:
    limited = make_key(fleet, "minilm-only", targets=["mini*"])
    assert len(stub.Embed(embed("minilm"), metadata=auth(limited)).embeddings) == 384
    error = rpc_error(lambda: stub.Embed(embed("other"), metadata=auth(limited)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "API key 'minilm-only' may not use instance 'other'"
    by_model = mux.EmbedRequest(
        target=mux.Target(model_id=OTHER_MODEL), request=tei_pb2.EmbedRequest(inputs="x")
    )
    assert rpc_error(lambda: stub.Embed(by_model, metadata=auth(limited))).code() == (
        grpc.StatusCode.PERMISSION_DENIED
    )

    tei = http(fleet, "/instances/other/embed")
    refused = request(tei, {"inputs": "x"}, headers={"Authorization": f"Bearer {limited}"})
    assert (refused.status, refused.json["error_type"]) == (403, "Forbidden")
    assert "may not use instance 'other'" in refused.json["error"]
    listed = request(http(fleet, "/v1/models"), headers={"X-API-Key": limited})
    assert [m["id"] for m in listed.json["data"]] == ["minilm", MINILM_ID]
    everything = make_key(fleet, "everything")
    listed = request(http(fleet, "/v1/models"), headers={"X-API-Key": everything})
    assert {m["id"] for m in listed.json["data"]} == {"minilm", "other", MINILM_ID, OTHER_MODEL}
    one = request(http(fleet, "/v1/models/other"), headers={"X-API-Key": limited})
    assert (one.status, one.json["error"]["type"]) == (403, "permission_error")

    client = openai.OpenAI(base_url=http(fleet, "/v1"), api_key=limited, max_retries=0)
    assert len(client.embeddings.create(model="minilm", input="x").data[0].embedding) == 384
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model=OTHER_MODEL, input="x")


def test_http_refuses_a_missing_or_invalid_key_in_each_routes_shape(
    fleet: BackgroundMultiplexer,
) -> None:
    ops = make_key(fleet, "ops", "admin")
    for headers, status in ((None, 401), ({"Authorization": "Bearer no.pe"}, 401)):
        tei = request(http(fleet, "/instances/minilm/embed"), {"inputs": "x"}, headers=headers)
        assert (tei.status, tei.json["error_type"]) == (status, "Unauthorized")
        assert tei.headers["www-authenticate"] == "Bearer"
        compat = request(
            http(fleet, "/instances/minilm/v1/embeddings"), {"input": "x"}, headers=headers
        )
        assert (compat.status, compat.json["type"]) == (status, "Unauthorized")
        body = {"model": "minilm", "input": "x"}
        oai = request(http(fleet, "/v1/embeddings"), body, headers=headers)
        assert (oai.status, oai.json["error"]["type"]) == (status, "authentication_error")
        assert request(http(fleet, "/v1/models"), headers=headers).status == status
    scoped = request(
        http(fleet, "/instances/minilm/embed"), {"inputs": "x"}, headers={"X-API-Key": ops}
    )
    assert (scoped.status, scoped.json["error_type"]) == (403, "Forbidden")
    assert request(http(fleet, "/health")).status == 200  # open
    assert request(http(fleet, "/openapi.json")).status == 200
    stranger = openai.OpenAI(base_url=http(fleet, "/v1"), api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.embeddings.create(model="minilm", input="x")


def test_the_rate_limit_refuses_with_retry_after(stub: Any, fleet: BackgroundMultiplexer) -> None:
    slow = make_key(fleet, "slow", rate_per_sec=0.05, burst=2)
    stub.Embed(embed(), metadata=auth(slow))
    stub.Embed(embed(), metadata=auth(slow))
    call = stub.Embed.with_call
    with pytest.raises(grpc.RpcError) as caught:
        call(embed(), metadata=auth(slow))
    error: Any = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "rate limit of 0.05 calls/s" in error.details()
    retry = dict(error.trailing_metadata())["retry-after"]
    assert 1 <= int(retry) <= 20

    headers = {"Authorization": f"Bearer {slow}"}
    tei = request(http(fleet, "/instances/minilm/embed"), {"inputs": "x"}, headers=headers)
    assert (tei.status, tei.json["error_type"]) == (429, "Overloaded")
    assert 1 <= int(tei.headers["retry-after"]) <= 20
    oai = request(http(fleet, "/v1/embeddings"), {"model": "minilm", "input": "x"}, headers=headers)
    assert (oai.status, oai.json["error"]["type"]) == (429, "rate_limit_error")
    assert "retry-after" in oai.headers


def test_a_revoked_key_stops_working_within_a_second(
    stub: Any, fleet: BackgroundMultiplexer
) -> None:
    secret = make_key(fleet, "leaving")
    assert stub.Embed(embed(), metadata=auth(secret)).embeddings
    keys.revoke_key("leaving")

    def refused() -> bool:
        try:
            stub.Embed(embed(), metadata=auth(secret), timeout=5)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
            return True
        return False

    # The refresher reads every 0.2 s here (0.5 s by default): about 1 s leaves room for a
    # loaded machine, and for the read itself.
    assert wait(refused, timeout=10) < 1.5


def test_the_multiplexer_writes_when_each_key_was_last_used(
    stub: Any, fleet: BackgroundMultiplexer
) -> None:
    from access.models import ApiKey

    secret = make_key(fleet, "counted")
    stub.Embed(embed(), metadata=auth(secret))
    refresher = server(fleet).refresher
    refresher.write_last_used()  # what its thread does every heartbeat (5 s)
    assert ApiKey.objects.get(name="counted").last_used_at is not None


@pytest.mark.parametrize(
    ("options", "required"),
    [
        ({"listeners": ("0.0.0.0",)}, True),  # another listener of the fleet binds wide
        ({"auth_required": "true"}, True),
        ({"auth_required": "false", "listeners": ("0.0.0.0",)}, False),
    ],
)
def test_protected_mode_without_any_key(
    locked: LocalTEI, options: dict[str, Any], required: bool
) -> None:
    add_row("minilm", MINILM_ID, locked.port, api_key=INSTANCE_KEY, node="keys-tests")
    settings = ServerOptions(host="127.0.0.1", port=0, **options)
    with BackgroundMultiplexer(settings) as background:
        wait(lambda: "minilm" in server(background).router.table.by_name)
        with grpc.insecure_channel(f"127.0.0.1:{server(background).port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            if required:
                error = rpc_error(lambda: stub.Embed(embed()))
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            else:
                assert stub.Embed(embed()).embeddings
