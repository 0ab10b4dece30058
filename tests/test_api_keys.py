"""The REST API behind keys: protected mode both ways, 401 UNAUTHORIZED and 403 FORBIDDEN
in the envelope, Bearer and X-API-Key, staff sessions with CSRF, /health open, /metrics
open on loopback only, and the audit trail (GET /instances/{name}/events)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from access import keys
from access.models import ApiKey, AuditEvent
from instances.models import Instance
from tests.test_api import MODEL, assert_error

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def configure(settings: Any, **changes: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, **changes)


def bearer(secret: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def create(api: APIClient, name: str, **headers: str) -> Any:
    return api.post("/instances", {"name": name, "model_id": MODEL}, format="json", **headers)


def test_an_open_fleet_needs_no_key_and_ignores_one_that_does_not_pass(api: APIClient) -> None:
    assert create(api, name="open").status_code == 201
    assert api.get("/instances", **bearer("not.a-key")).status_code == 200


def test_once_a_key_exists_every_call_needs_one(api: APIClient) -> None:
    admin = keys.create_key("ops", ["admin"]).secret
    for response in (
        api.get("/instances"),
        api.get("/instances/any"),
        api.get("/instances/any/logs"),
        api.get("/instances/any/events"),
        create(api, name="nope"),
        api.post("/instances/any/start"),
        api.delete("/instances/any"),
    ):
        body = assert_error(response, 401, "UNAUTHORIZED")
        assert "Bearer" in body["error"] and response["WWW-Authenticate"].startswith("Bearer")
    assert not Instance.objects.exists()
    assert create(api, name="keyed", **bearer(admin)).status_code == 201
    assert api.get("/instances", HTTP_X_API_KEY=admin).status_code == 200
    assert api.get("/health").status_code in (200, 503)  # open, whatever its verdict


def test_it_refuses_a_key_that_does_not_pass(api: APIClient) -> None:
    admin = keys.create_key("ops", ["admin"]).secret
    prefix = admin.split(".")[0]
    keys.create_key("gone", ["admin"])
    gone = keys.create_key("gone-too", ["admin"]).secret
    keys.revoke_key("gone-too")
    brief = keys.create_key("brief", ["admin"], expires=timezone.now() + timedelta(hours=1))
    ApiKey.objects.filter(name="brief").update(expiry_date=timezone.now() - timedelta(seconds=1))
    for presented, says in (
        ("garbage", "invalid API key"),
        (f"{prefix}.{'x' * 32}", "invalid API key"),
        (gone, "API key 'gone-too' is revoked"),
        (brief.secret, "API key 'brief' expired"),
    ):
        body = assert_error(api.get("/instances", **bearer(presented)), 401, "UNAUTHORIZED")
        assert body["error"] == says
        assert presented not in body["error"]


def test_an_inference_key_may_not_use_the_control_plane(api: APIClient) -> None:
    inference = keys.create_key("app", ["inference"]).secret
    body = assert_error(create(api, name="x", **bearer(inference)), 403, "FORBIDDEN")
    assert "no admin scope" in body["error"]
    assert_error(api.get("/instances", **bearer(inference)), 403, "FORBIDDEN")
    both = keys.create_key("both", ["admin", "inference"]).secret
    assert api.get("/instances", **bearer(both)).status_code == 200


def test_a_listener_beyond_loopback_protects_the_fleet_without_any_key(
    api: APIClient, settings: Any
) -> None:
    configure(settings, bind="0.0.0.0")
    assert_error(api.get("/instances"), 401, "UNAUTHORIZED")
    configure(settings, bind="127.0.0.1", grpc_host="10.1.2.3")
    assert_error(api.get("/instances"), 401, "UNAUTHORIZED")


def test_auth_required_forces_protected_mode_either_way(api: APIClient, settings: Any) -> None:
    configure(settings, auth_required="true")
    assert_error(create(api, name="x"), 401, "UNAUTHORIZED")
    keys.create_key("ops", ["admin"])
    configure(settings, auth_required="false", bind="0.0.0.0")
    assert create(api, name="open-anyway").status_code == 201


def test_staff_sessions_keep_working_with_csrf(settings: Any) -> None:
    keys.create_key("ops", ["admin"])  # protected
    staff = get_user_model().objects.create_user("op", password="pw", is_staff=True)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    assert browser.get("/instances").status_code == 200
    # A staff user without the permission to operate instances may only read.
    refused = browser.post("/instances", {"name": "x", "model_id": MODEL}, "application/json")
    assert_error(refused, 403, "FORBIDDEN")
    staff.is_superuser = True
    staff.save()
    browser.force_login(staff)
    no_token = browser.post("/instances", {"name": "x", "model_id": MODEL}, "application/json")
    assert "CSRF" in assert_error(no_token, 403, "FORBIDDEN")["error"]
    browser.get("/admin/")  # sets the CSRF cookie
    token = browser.cookies["csrftoken"].value
    made = browser.post(
        "/instances",
        {"name": "by-op", "model_id": MODEL},
        "application/json",
        HTTP_X_CSRFTOKEN=token,
    )
    assert made.status_code == 201, made.content
    event = AuditEvent.objects.get(subject="by-op")
    assert (event.actor_kind, event.actor, event.result) == ("user", "op", "ok")

    user = get_user_model().objects.create_user("nobody", password="pw")  # not staff
    browser.force_login(user)
    assert_error(browser.get("/instances"), 401, "UNAUTHORIZED")


def test_metrics_are_open_on_loopback_and_need_a_key_elsewhere(
    api: APIClient, settings: Any
) -> None:
    secret = keys.create_key("prometheus", ["inference"]).secret  # any scope will do
    assert api.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    remote = {"REMOTE_ADDR": "10.0.0.5"}
    assert_error(api.get("/metrics", **remote), 401, "UNAUTHORIZED")
    proxied = {"HTTP_X_FORWARDED_FOR": "203.0.113.7"}  # nginx on this host, a remote client
    assert_error(api.get("/metrics", **proxied), 401, "UNAUTHORIZED")
    assert api.get("/metrics", **remote, **bearer(secret)).status_code == 200
    configure(settings, metrics_public=True)
    assert api.get("/metrics", **remote).status_code == 200


def test_every_change_is_audited_with_who_where_and_the_result(api: APIClient) -> None:
    admin = keys.create_key("deployer", ["admin"]).secret
    who = {**bearer(admin), "REMOTE_ADDR": "192.0.2.10"}
    assert create(api, name="audited", **who).status_code == 201
    assert_error(api.post("/instances/audited/start", **who), 409, "ALREADY_RUNNING")
    assert api.post("/instances/audited/stop", **who).status_code == 200
    assert api.delete("/instances/audited", **who).status_code == 200

    # Still told after the delete: who deleted it is the question an operator asks.
    events = api.get("/instances/audited/events", **bearer(admin)).json()
    assert [(e["action"], e["result"]) for e in events] == [
        ("delete", "ok"),
        ("stop", "ok"),
        ("start", "ALREADY_RUNNING"),
        ("create", "ok"),
    ]
    for event in events:
        assert (event["actor_kind"], event["actor"], event["address"]) == (
            "key",
            "deployer",
            "192.0.2.10",
        )
        assert event["at"].endswith("Z")
    assert "already pending" in events[2]["detail"]
    assert len(api.get("/instances/audited/events?limit=2", **bearer(admin)).json()) == 2
    assert_error(api.get("/instances/never/events", **bearer(admin)), 404, "INSTANCE_NOT_FOUND")
    assert_error(
        api.get("/instances/audited/events?limit=0", **bearer(admin)), 400, "VALIDATION_ERROR"
    )
    key_events = AuditEvent.objects.filter(subject_kind="api_key", subject="deployer")
    assert [(e.action, e.result) for e in key_events] == [("key.create", "ok")]


def test_an_open_fleet_audits_changes_as_anonymous_with_the_address(api: APIClient) -> None:
    assert create(api, name="anon", REMOTE_ADDR="127.0.0.1").status_code == 201
    event = AuditEvent.objects.get(subject="anon")
    assert (event.actor_kind, event.actor, event.address) == ("anonymous", "", "127.0.0.1")


def test_the_instance_key_is_never_shown(api: APIClient) -> None:
    assert create(api, name="hidden").status_code == 201
    secret = Instance.objects.get(name="hidden").api_key
    assert len(secret) >= 32
    for path in ("/instances", "/instances/hidden", "/instances/hidden/events", "/metrics"):
        assert secret not in api.get(path).content.decode(), path
