"""The model registry's REST API and discovery: register, read, delete (MODEL_BUSY while
an instance uses the model), ids with '/', the error codes in the envelope, the admin
scope in protected mode, and what discovery finds (the HF cache, the packaged model, the
config file's [[models]]). Downloads: tests/test_registry_download.py; checks and
on-demand starts: tests/test_registry_live.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

from access import keys
from instances.models import Instance
from registry import discovery
from registry.models import Model, ModelStatus, Source
from registry.serializers import validate_model_entries
from teimanager.config import ConfigError
from tests.localtei_fixtures import MINILM_ID, build_hf_cache, build_tiny_model
from tests.test_api import assert_error

pytestmark = pytest.mark.django_db
TINY_ID = "tiny-org/tiny-bert"


def register(api: APIClient, model_id: str, **fields: Any) -> Any:
    return api.post("/models", {"model_id": model_id, **fields}, format="json")


def test_it_registers_a_model_and_reads_it_back_by_an_id_with_a_slash(api: APIClient) -> None:
    response = register(api, "org/not-here", pooling="mean", on_demand=True, idle_timeout_secs=60)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "available" and body["source"] == "api"
    assert (body["pooling"], body["on_demand"], body["idle_timeout_secs"]) == ("mean", True, 60)
    assert api.get("/models/org/not-here").json()["model_id"] == "org/not-here"
    assert [m["model_id"] for m in api.get("/models").json()] == ["org/not-here"]


def test_a_model_whose_files_are_here_registers_as_downloaded(api: APIClient) -> None:
    body = register(api, MINILM_ID).json()
    assert body["status"] == "downloaded" and body["size_on_disk"] > 1_000_000


def test_it_refuses_a_second_registration_and_unknown_ids(api: APIClient) -> None:
    register(api, "org/twice")
    assert_error(register(api, "org/twice"), 409, "MODEL_EXISTS")
    assert_error(api.get("/models/org/nothing"), 404, "MODEL_NOT_FOUND")
    assert_error(api.delete("/models/org/nothing"), 404, "MODEL_NOT_FOUND")
    assert_error(api.post("/models/org/nothing/download"), 404, "MODEL_NOT_FOUND")
    assert_error(api.post("/models/org/nothing/verify"), 404, "MODEL_NOT_FOUND")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"model_id": "-flag"}, "model_id"),
        ({"model_id": "org/x", "pooling": "max"}, "pooling"),
        ({"model_id": "org/x", "idle_timeout_secs": 0}, "idle_timeout_secs"),
        ({"model_id": "org/download"}, "model_id"),
        ({"model_id": "org/x", "colour": "red"}, "colour"),
    ],
)
def test_it_refuses_a_bad_registration(api: APIClient, fields: dict[str, Any], field: str) -> None:
    body = assert_error(api.post("/models", fields, format="json"), 400, "VALIDATION_ERROR")
    assert body["error"].startswith(f"{field}:")


def test_an_action_route_is_not_taken_for_a_model_id(api: APIClient) -> None:
    register(api, "org/x")
    assert_error(api.get("/models/org/x/download"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.get("/models/org/x/nothing"), 404, "MODEL_NOT_FOUND")


def test_a_model_in_use_or_busy_cannot_be_deleted(api: APIClient) -> None:
    register(api, "org/used")
    Instance.objects.create(name="user", model_id="org/used", port=30001, prometheus_port=30002)
    body = assert_error(api.delete("/models/org/used"), 409, "MODEL_BUSY")
    assert "user" in body["error"]
    Instance.objects.all().delete()
    Model.objects.filter(model_id="org/used").update(status=ModelStatus.DOWNLOADING)
    assert_error(api.delete("/models/org/used"), 409, "MODEL_BUSY")
    assert_error(api.post("/models/org/used/download"), 409, "MODEL_BUSY")
    assert_error(api.post("/models/org/used/verify"), 409, "MODEL_BUSY")
    Model.objects.filter(model_id="org/used").update(status=ModelStatus.AVAILABLE)
    assert_error(api.post("/models/org/used/cancel"), 409, "NOT_DOWNLOADING")
    assert api.delete("/models/org/used").json() == {"model_id": "org/used", "deleted": True}
    assert not Model.objects.exists()


def test_registry_changes_need_the_admin_scope_in_protected_mode(api: APIClient) -> None:
    reader = keys.create_key("reader", ["inference"]).secret
    admin = keys.create_key("ops", ["admin"]).secret
    assert_error(register(api, "org/k"), 401, "UNAUTHORIZED")
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {reader}")
    assert_error(register(api, "org/k"), 403, "FORBIDDEN")
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {admin}")
    assert register(api, "org/k").status_code == 201


def test_discovery_finds_the_cache_the_package_and_the_config(
    tmp_path: Path, settings: Any
) -> None:
    build_hf_cache(tmp_path / "hub", TINY_ID, build_tiny_model("embedding", tmp_path / "m"))
    entries = ({"model_id": "org/from-config", "on_demand": True, "pooling": "cls"},)
    settings.TEI = dataclasses.replace(settings.TEI, models=entries)
    added = discovery.discover(tmp_path / "hub")
    assert sorted(added) == sorted([TINY_ID, MINILM_ID, "org/from-config"])
    rows = {m.model_id: m for m in Model.objects.all()}
    assert (rows[TINY_ID].source, rows[TINY_ID].status) == (Source.CACHE, "downloaded")
    assert rows[TINY_ID].size_on_disk and rows[TINY_ID].commit_sha
    assert (rows[MINILM_ID].source, rows[MINILM_ID].status) == (Source.PACKAGED, "downloaded")
    config_row = rows["org/from-config"]
    assert (config_row.source, config_row.status, config_row.on_demand) == (
        "config",
        "available",
        True,
    )
    assert discovery.discover(tmp_path / "hub") == []  # idempotent
    assert Model.objects.count() == 3


def test_discovery_tolerates_a_missing_cache(tmp_path: Path) -> None:
    assert discovery.in_hf_cache(tmp_path / "none") == []


def test_the_command_registers_what_it_finds() -> None:
    from io import StringIO

    out = StringIO()
    call_command("discover_models", stdout=out)
    assert MINILM_ID in out.getvalue()
    assert Model.objects.filter(model_id=MINILM_ID, source=Source.PACKAGED).exists()


def test_a_bad_models_entry_names_its_key(settings: Any) -> None:
    from registry.checks import check_model_entries

    with pytest.raises(ConfigError, match=r"models\[1\]\.pooling"):
        validate_model_entries([{"model_id": "org/a"}, {"model_id": "org/b", "pooling": "max"}])
    settings.TEI = dataclasses.replace(settings.TEI, models=({"model_id": "org/a"},))
    assert check_model_entries(None) == []
    settings.TEI = dataclasses.replace(settings.TEI, models=({"model_id": "-a"},))
    [error] = check_model_entries(None)
    assert error.id == "registry.E001" and error.msg.startswith("config key 'models[0].model_id'")


@pytest.fixture
def fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


MODELS_PAGE = "/admin/registry/model/"


def test_the_models_page_shows_badges_progress_and_actions(
    fast_passwords: None, admin_client: Any
) -> None:
    Model.objects.create(
        model_id="org/half", status=ModelStatus.DOWNLOADING, bytes_done=50, bytes_total=200
    )
    Model.objects.create(
        model_id="org/done", status=ModelStatus.VERIFIED, size_on_disk=90_900_000, dimensions=384
    )
    page = admin_client.get(MODELS_PAGE).content.decode()
    assert 'class="tei-badge tei-badge--downloading"' in page
    assert 'class="tei-badge tei-badge--verified"' in page
    assert '<progress class="tei-progress" value="50" max="200"></progress> 25%' in page
    assert "90.9 MB" in page and ">384<" in page
    assert "/admin/instances/instance/add/?model_id=org%2Fdone" in page
    response = admin_client.post(
        MODELS_PAGE,
        {
            "action": "download_selected",
            "_selected_action": [Model.objects.get(model_id="org/done").pk],
        },
        follow=True,
    )
    assert "Downloading org/done." in response.content.decode()
    assert Model.objects.get(model_id="org/done").status == "downloading"
    response = admin_client.post(
        MODELS_PAGE,
        {
            "action": "verify_selected",
            "_selected_action": [Model.objects.get(model_id="org/half").pk],
        },
        follow=True,
    )
    from django.contrib.messages import get_messages

    said = [str(m) for m in get_messages(response.wsgi_request)]
    assert said == ["org/half: model 'org/half' is downloading"], said


def test_the_instance_add_form_offers_registered_models_with_their_defaults(
    fast_passwords: None, admin_client: Any
) -> None:
    Model.objects.create(
        model_id="org/tuned", pooling="mean", max_batch_tokens=2048, idle_timeout_secs=120
    )
    page = admin_client.get("/admin/instances/instance/add/?model_id=org/tuned").content.decode()
    assert '<datalist id="tei-registered-models"><option value="org/tuned"></datalist>' in page
    assert 'name="max_batch_tokens" value="2048"' in page
    assert 'name="idle_timeout_secs" value="120"' in page
    assert '<option value="mean" selected>' in page


def test_a_model_registers_from_the_admin_with_the_apis_rules(
    fast_passwords: None, admin_client: Any
) -> None:
    form = {"model_id": "org/admin-added", "revision": "", "pooling": "", "dtype": "",
            "max_batch_tokens": 16384, "max_concurrent_requests": 512,
            "auto_truncate": "on"}  # fmt: skip
    response = admin_client.post(MODELS_PAGE + "add/", form, follow=True)
    assert response.status_code == 200
    assert Model.objects.get(model_id="org/admin-added").source == Source.API
    response = admin_client.post(MODELS_PAGE + "add/", {**form, "model_id": "-x"})
    assert "must not start with" in response.content.decode()
