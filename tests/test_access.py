"""Keys from the host's shell (`manage.py apikey`), the protected-mode check
(access.E001), the settings that go with it, and keys in the admin."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from io import StringIO
from typing import Any

import pytest
from django.contrib.messages import get_messages
from django.core.management import CommandError, call_command
from django.test import Client

from access import keys
from access.checks import check_protected_mode
from access.models import ApiKey, AuditEvent
from teimanager.config import ConfigError, is_loopback, load_config
from tests.conftest import ROOT, TEST_ENV

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def run(*args: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_apikey_create_prints_the_key_alone_on_its_last_line_and_keeps_only_a_hash() -> None:
    output = run("apikey", "create", "ci", "--scope", "inference", "--targets", "bge-*,minilm",
                 "--rate", "5", "--burst", "10", "--expires", "30d")  # fmt: skip
    secret = output.strip().splitlines()[-1]
    assert re.fullmatch(r"[A-Za-z0-9]{8}\.[A-Za-z0-9]{32}", secret), output
    key = ApiKey.objects.get(name="ci")
    assert key.prefix == secret.split(".")[0] and key.prefix in output
    assert secret not in key.hashed_key and key.hashed_key.startswith("sha512$$")
    assert (key.scopes, key.targets, key.rate_per_sec, key.burst) == (
        ["inference"],
        ["bge-*", "minilm"],
        5.0,
        10,
    )
    assert key.expiry_date is not None and keys.authenticate(secret) == key
    event = AuditEvent.objects.get(subject="ci")
    assert (event.action, event.actor_kind, event.address, event.result) == (
        "key.create",
        "command",
        "local",
        "ok",
    )


def test_apikey_list_shows_every_key_but_never_a_key_itself() -> None:
    secret = keys.create_key("ops", ["admin", "inference"]).secret
    keys.create_key("old", ["inference"], targets=["a*"])
    run("apikey", "revoke", "old")
    listing = run("apikey", "list")
    assert secret not in listing and secret.split(".")[1] not in listing
    lines = {line.split()[0]: line for line in listing.splitlines()[1:]}
    assert "admin,inference" in lines["ops"] and "active" in lines["ops"]
    assert "a*" in lines["old"] and "revoked" in lines["old"]


def test_apikey_revoke_refuses_an_unknown_name_and_audits_both() -> None:
    keys.create_key("leaving", ["inference"])
    assert "Revoked API key 'leaving'" in run("apikey", "revoke", "leaving")
    assert ApiKey.objects.get(name="leaving").revoked
    with pytest.raises(CommandError, match="no API key named 'ghost'"):
        run("apikey", "revoke", "ghost")
    results = AuditEvent.objects.filter(action="key.revoke").values_list("subject", "result")
    assert sorted(results) == [("ghost", "KeyChangeError"), ("leaving", "ok")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad name", "--scope", "admin"], "letters, digits"),
        (["x", "--scope", "admin", "--targets", "a;b"], "target 'a;b'"),
        (["x", "--scope", "admin", "--rate", "0"], "above 0"),
        (["x", "--scope", "admin", "--burst", "3"], "a burst needs a rate"),
        (["x", "--scope", "admin", "--expires", "yesterday"], "--expires 'yesterday'"),
        (["x", "--scope", "admin", "--expires", "2001-01-01"], "in the future"),
    ],
)
def test_apikey_create_refuses_bad_fields(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        run("apikey", "create", *args)
    assert not ApiKey.objects.exists()


def test_apikey_create_refuses_a_name_taken() -> None:
    keys.create_key("twice", ["admin"])
    with pytest.raises(CommandError, match="exists already"):
        run("apikey", "create", "twice", "--scope", "admin")


def test_check_e001_refuses_auth_forced_off_beyond_loopback(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, auth_required="false")
    assert check_protected_mode(None) == []  # loopback only: fine
    settings.TEI = dataclasses.replace(settings.TEI, auth_required="false", bind="0.0.0.0")
    [error] = check_protected_mode(None)
    assert error.id == "access.E001" and "web (TEI_MANAGER_BIND) on 0.0.0.0" in error.msg
    settings.TEI = dataclasses.replace(settings.TEI, auth_required="auto", bind="0.0.0.0")
    assert check_protected_mode(None) == []


def test_manage_py_check_reports_e001() -> None:
    env = {**os.environ, **TEST_ENV, "TEI_MANAGER_AUTH_REQUIRED": "false"}
    env["TEI_MANAGER_GRPC_HOST"] = "10.0.0.1"
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "access.E001" in result.stderr and "multiplexer on 10.0.0.1" in result.stderr


def test_protected_mode_and_cookies_are_configured_by_key() -> None:
    assert load_config(env={}).auth_required == "auto"
    assert load_config(env={"TEI_MANAGER_AUTH_REQUIRED": "true"}).auth_required == "true"
    with pytest.raises(ConfigError, match="TEI_MANAGER_AUTH_REQUIRED"):
        load_config(env={"TEI_MANAGER_AUTH_REQUIRED": "yes please"})
    with pytest.raises(ConfigError, match="TEI_MANAGER_SECURE_COOKIES"):
        load_config(env={"TEI_MANAGER_SECURE_COOKIES": "sometimes"})
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "[::1]", "localhost", "127.8.0.1")] == [
        True
    ] * 5
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com", ""))


@pytest.mark.parametrize(
    ("env", "secure"),
    [
        ({}, False),
        ({"TEI_MANAGER_BIND": "0.0.0.0"}, True),
        ({"CSRF_TRUSTED_ORIGINS": "https://tei.example.com"}, True),
        ({"TEI_MANAGER_BIND": "0.0.0.0", "TEI_MANAGER_SECURE_COOKIES": "false"}, False),
    ],
)
def test_cookies_are_secure_when_the_site_is_not_on_loopback(
    env: dict[str, str], secure: bool
) -> None:
    script = (
        "from django.conf import settings; "
        "print(settings.SESSION_COOKIE_SECURE, settings.CSRF_COOKIE_SECURE, settings.DEBUG)"
    )
    environment = {**os.environ, **TEST_ENV, **env}
    environment.pop("DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {script}"],
        cwd=ROOT, env=environment, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.split() == [str(secure), str(secure), "False"]  # DEBUG off


def test_the_admin_shows_a_new_key_once_and_audits_its_changes(admin_client: Client) -> None:
    added = admin_client.post(
        "/admin/access/apikey/add/",
        {"name": "from-admin", "scopes": ["inference"], "targets": "bge-*, minilm"},
        follow=True,
    )
    assert added.status_code == 200
    [message] = [str(m) for m in get_messages(added.wsgi_request) if "not shown" in str(m)]
    secret = re.search(r"[A-Za-z0-9]{8}\.[A-Za-z0-9]{32}", message)
    assert secret is not None
    key = ApiKey.objects.get(name="from-admin")
    assert key.targets == ["bge-*", "minilm"] and keys.authenticate(secret.group()) == key

    page = admin_client.get(f"/admin/access/apikey/{key.pk}/change/").content.decode()
    assert secret.group() not in page and key.prefix in page
    listing = admin_client.get("/admin/access/apikey/").content.decode()
    assert secret.group() not in listing and "bge-*, minilm" in listing

    refused = admin_client.post(
        "/admin/access/apikey/add/", {"name": "bad", "scopes": ["admin"], "targets": "a;b"}
    )
    assert "target &#x27;a;b&#x27;" in refused.content.decode()
    admin_client.post(
        "/admin/access/apikey/",
        {"action": "revoke_selected", "_selected_action": [key.pk]},
        follow=True,
    )
    assert ApiKey.objects.get(name="from-admin").revoked
    events = AuditEvent.objects.filter(subject="from-admin").order_by("at", "id")
    assert [(e.action, e.actor_kind, e.actor) for e in events] == [
        ("key.create", "user", "admin"),
        ("key.revoke", "user", "admin"),
    ]
    audit_page = admin_client.get("/admin/access/auditevent/").content.decode()
    assert "from-admin" in audit_page and "key.revoke" in audit_page
