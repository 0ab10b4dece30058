"""The data plane's key check without a socket: protected mode, the cached verification,
scopes, allowed targets and the token bucket (multiplexer/keys.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import grpc
import pytest
from django.utils import timezone

from access import keys
from multiplexer.keys import Bucket, KeyRefusal, Keyring, load_key_table
from multiplexer.routing import Route, RoutingError, RoutingTable
from multiplexer.wire import Target

pytestmark = pytest.mark.django_db

TABLE = RoutingTable.build(
    [
        Route("bge-a", "BAAI/bge-small", "127.0.0.1:1", "running"),
        Route("bge-b", "BAAI/bge-small", "127.0.0.1:2", "running"),
        Route("minilm", "sentence-transformers/all-MiniLM-L6-v2", "127.0.0.1:3", "running"),
        Route("secret", "org/secret", "127.0.0.1:4", "running"),
    ]
)


def keyring(mode: str = "auto", open_listener: bool = False) -> Keyring:
    ring = Keyring(mode, open_listener)
    ring.update(load_key_table())
    return ring


def refusal(call: Any) -> KeyRefusal:
    with pytest.raises(KeyRefusal) as caught:
        call()
    return caught.value


def test_an_open_fleet_checks_nothing_until_a_key_exists() -> None:
    assert keyring().check(None) is None
    assert keyring().check("anything") is None  # the OpenAI SDK always sends one
    keys.create_key("first", ["inference"])
    assert refusal(lambda: keyring().check(None)).code is grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("mode", "open_listener", "required"),
    [
        ("auto", False, False),
        ("auto", True, True),
        ("true", False, True),
        ("false", True, False),
    ],
)
def test_protected_mode_follows_the_listeners_and_the_mode(
    mode: str, open_listener: bool, required: bool
) -> None:
    ring = keyring(mode, open_listener)
    assert ring.required is required
    if required:
        assert refusal(lambda: ring.check(None)).code is grpc.StatusCode.UNAUTHENTICATED
    else:
        assert ring.check(None) is None


def test_it_accepts_a_valid_key_and_refuses_anything_else() -> None:
    secret = keys.create_key("ci", ["inference"]).secret
    other = keys.create_key("other", ["inference"]).secret
    ring = keyring()
    grant = ring.check(secret)
    assert grant is not None and grant.name == "ci"
    assert ring.check(secret) is grant  # the second check is a cache hit
    prefix = secret.split(".")[0]
    for wrong in ("nonsense", f"{prefix}.{'x' * 32}", f"{other.split('.')[0]}.{secret[9:]}"):
        refused = refusal(lambda w=wrong: ring.check(w))
        assert (refused.code, refused.message) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid API key",
        )


def test_a_revoked_or_expired_key_is_refused_once_the_table_says_so() -> None:
    secret = keys.create_key("soon-gone", ["inference"]).secret
    ring = keyring()
    assert ring.check(secret) is not None
    keys.revoke_key("soon-gone")
    assert ring.check(secret) is not None  # the old table, until the refresher swaps
    ring.update(load_key_table())
    assert "revoked" in refusal(lambda: ring.check(secret)).message

    expired = keys.create_key("brief", ["inference"], expires=timezone.now() + timedelta(hours=1))
    from access.models import ApiKey

    ApiKey.objects.filter(name="brief").update(expiry_date=timezone.now() - timedelta(seconds=1))
    ring.update(load_key_table())
    assert "expired" in refusal(lambda: ring.check(expired.secret)).message


def test_an_admin_key_cannot_call_the_data_plane() -> None:
    secret = keys.create_key("ops", ["admin"]).secret
    refused = refusal(lambda: keyring().check(secret))
    assert refused.code is grpc.StatusCode.PERMISSION_DENIED
    assert "no inference scope" in refused.message


def test_a_key_limited_to_targets_routes_only_to_them() -> None:
    secret = keys.create_key("bge-only", ["inference"], targets=["bge-*", "org/other"]).secret
    grant = keyring().check(secret)
    assert grant is not None
    by_name = grant.candidates(TABLE, Target(instance_name="bge-b"))
    assert [r.name for r in by_name] == ["bge-b"]
    by_model = grant.candidates(TABLE, Target(model_id="BAAI/bge-small"))
    assert [r.name for r in by_model] == ["bge-a", "bge-b"]
    for forbidden in (
        Target(instance_name="secret"),
        Target(instance_name="no-such-instance"),  # existence is not told either
        Target(model_id="org/secret"),
        Target(instance_index=2),  # minilm
    ):
        refused = refusal(lambda t=forbidden: grant.candidates(TABLE, t))
        assert refused.code is grpc.StatusCode.PERMISSION_DENIED, forbidden
    with pytest.raises(RoutingError) as missing:  # allowed but absent: NOT_FOUND as ever
        grant.candidates(TABLE, Target(model_id="org/other"))
    assert missing.value.code is grpc.StatusCode.NOT_FOUND


def test_a_model_pattern_covers_its_replicas_and_a_name_pattern_narrows_a_model() -> None:
    baai = keys.create_key("baai", ["inference"], targets=["BAAI/*"]).secret
    one_replica = keys.create_key("one", ["inference"], targets=["bge-b"]).secret
    by_model, one = keyring().check(baai), keyring().check(one_replica)
    assert by_model is not None and one is not None
    assert [r.name for r in by_model.candidates(TABLE, Target(instance_name="bge-a"))] == ["bge-a"]
    assert [r.name for r in one.candidates(TABLE, Target(model_id="BAAI/bge-small"))] == ["bge-b"]


def test_the_rate_limit_refuses_past_the_burst_and_says_when_to_retry() -> None:
    secret = keys.create_key("slow", ["inference"], rate_per_sec=0.01, burst=2).secret
    ring = keyring()
    ring.check(secret)
    ring.check(secret)
    refused = refusal(lambda: ring.check(secret))
    assert refused.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.retry_after is not None and 1 <= refused.retry_after <= 100
    assert "rate limit of 0.01 calls/s" in refused.message


def test_a_token_bucket_refills_at_its_rate() -> None:
    bucket = Bucket(rate=2.0, burst=3.0, now=100.0)
    assert [bucket.take(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(100.0) == pytest.approx(0.5)
    assert bucket.take(100.5) == 0.0  # half a second: one token back
    assert bucket.take(200.0) == 0.0 and bucket.tokens == 2.0  # never above the burst


def test_last_use_is_kept_in_memory_for_the_refresher_to_write() -> None:
    created = keys.create_key("used", ["inference"])
    ring = keyring()
    assert ring.used() == {}
    before = timezone.now().timestamp()
    ring.check(created.secret)
    (pk, stamp), *_ = ring.used().items()
    assert pk == created.key.pk and before - 1 <= stamp <= timezone.now().timestamp() + 1


def test_a_refused_key_is_never_echoed() -> None:
    keys.create_key("exists", ["inference"])
    presented = "abcdefgh.thisIsTheSecretPartOfAKeyxxxxx"
    refused = refusal(lambda: keyring().check(presented))
    assert "thisIsTheSecret" not in refused.message and "abcdefgh" not in refused.message
