"""Cross-site and DNS-rebinding protection of the REST API: unsafe methods only from the
server's own origin (or CSRF_TRUSTED_ORIGINS) when a browser sends them; any client that
sends no Origin and no Sec-Fetch-Site (curl, python) as before; Host names limited."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from instances.models import Instance
from teimanager.settings import default_allowed_hosts
from tests.test_api import MODEL, assert_error

pytestmark = pytest.mark.django_db

SELF = "http://testserver"  # the Django test client's own origin


def create(client: Client, name: str, **headers: str) -> Any:
    body = {"name": name, "model_id": MODEL}
    return client.post("/instances", body, content_type="application/json", headers=headers)


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://evil.example"},
        {"Origin": "null"},  # a sandboxed frame or a file:// page
        {"Origin": "http://testserver.evil.example"},
        {"Origin": "https://testserver"},  # another scheme is another origin
        {"Origin": "http://testserver:8080"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # another port or subdomain of the same site
    ],
)
def test_it_refuses_cross_origin_state_changes(client: Client, headers: dict[str, str]) -> None:
    body = assert_error(create(client, "x", **headers), 403, "CROSS_ORIGIN_REQUEST")
    assert "same-origin" in body["error"]
    assert not Instance.objects.exists()
    create(client, "made")  # nothing in the way of the ones that are not cross-origin
    for verb in ("start", "stop", "restart"):
        response = client.post(f"/instances/made/{verb}", "x", "text/plain", headers=headers)
        assert_error(response, 403, "CROSS_ORIGIN_REQUEST")
    assert_error(client.delete("/instances/made", headers=headers), 403, "CROSS_ORIGIN_REQUEST")
    made = Instance.objects.get()
    assert (made.status, made.desired_state, made.restarts) == ("pending", "running", 0)


def test_it_lets_scripts_and_its_own_pages_change_state(client: Client) -> None:
    assert create(client, "curl").status_code == 201  # no Origin, no Sec-Fetch-Site
    same_origin = {"Origin": SELF, "Sec-Fetch-Site": "same-origin"}
    assert create(client, "page", **same_origin).status_code == 201
    assert create(client, "typed", **{"Sec-Fetch-Site": "none"}).status_code == 201
    # start/stop/restart with no body at all, as `curl -X POST` sends them
    assert client.post("/instances/curl/stop").status_code == 200
    assert client.post("/instances/curl/restart", headers={"Origin": SELF}).status_code == 200
    assert client.delete("/instances/typed").status_code == 200
    assert set(Instance.objects.values_list("name", flat=True)) == {"curl", "page"}


def test_it_lets_reads_through_from_anywhere(client: Client) -> None:
    # A cross-origin page cannot read the answer (no CORS headers); reads change nothing.
    cross = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert client.get("/instances", headers=cross).status_code == 200
    health = client.get("/health", headers=cross)  # 200 or 503: its verdict, not a refusal
    assert health.status_code in (200, 503) and "heartbeats" in health.json()


def test_it_trusts_the_origins_it_is_told_to(client: Client, settings: Any) -> None:
    settings.CSRF_TRUSTED_ORIGINS = ["https://manager.example", "https://*.corp.example"]
    assert create(client, "one", Origin="https://manager.example").status_code == 201
    assert create(client, "two", Origin="https://ops.corp.example").status_code == 201
    assert_error(
        create(client, "three", Origin="http://ops.corp.example"), 403, "CROSS_ORIGIN_REQUEST"
    )


def test_it_answers_a_host_it_does_not_serve_with_the_envelope(client: Client) -> None:
    body = assert_error(
        client.get("/instances", HTTP_HOST="attacker.example"), 400, "DISALLOWED_HOST"
    )
    assert "attacker.example" in body["error"]
    response = client.post(
        "/instances",
        {"name": "rebound", "model_id": MODEL},
        content_type="application/json",
        HTTP_HOST="attacker.example",
    )
    assert_error(response, 400, "DISALLOWED_HOST")
    assert not Instance.objects.exists()


def test_it_serves_localhost_and_the_bind_address_by_default(settings: Any) -> None:
    loopback = ["localhost", "127.0.0.1", "[::1]"]
    assert default_allowed_hosts("127.0.0.1") == loopback
    assert default_allowed_hosts("10.1.2.3") == [*loopback, "10.1.2.3"]
    assert default_allowed_hosts("fd00::5") == [*loopback, "[fd00::5]"]
    every = default_allowed_hosts("0.0.0.0")
    assert every[:3] == loopback and len(every) == 4 and "*" not in every
    assert "*" not in settings.ALLOWED_HOSTS


def test_the_admin_keeps_its_own_csrf_protection(admin_user: Any) -> None:
    # The admin is not the API: its forms carry a CSRF token, its POSTs need one.
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    response = client.post("/admin/instances/instance/add/", {"name": "x", "model_id": MODEL})
    assert response.status_code == 403
    assert not Instance.objects.exists()
