"""Input the REST API must refuse with its envelope and a 4xx, never a 500 or an HTML
page: names with a trailing newline, JSON nested too deep, bodies too large, GPU ids
past the column's range."""

from __future__ import annotations

import json
from typing import Any

import pytest

from instances import gpu
from instances.api.serializers import MAX_INT
from instances.models import Instance
from tests.fake_nvml import use_fake_gpus
from tests.test_api import assert_error, create

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("name", ["dup\n", "dup\r\n", "\ndup", "dup\x00", "dúp"])
def test_it_refuses_a_name_with_anything_after_or_around_it(api: Any, name: str) -> None:
    create(api, name="dup")
    body = assert_error(create(api, name=name), 400, "VALIDATION_ERROR")
    assert body["error"].startswith("name:")
    assert list(Instance.objects.values_list("name", flat=True)) == ["dup"]


def test_it_refuses_json_nested_too_deep(api: Any) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    response = api.post("/instances", deep, content_type="application/json")
    body = assert_error(response, 400, "MALFORMED_JSON")
    assert "nested too deeply" in body["error"]
    nested = '{"name": "n", "model_id": "m", "extra_args": ' + "[" * 50_000 + "]" * 50_000 + "}"
    assert_error(
        api.post("/instances", nested, content_type="application/json"), 400, "MALFORMED_JSON"
    )
    assert not Instance.objects.exists()


def test_it_refuses_a_body_over_the_upload_limit(api: Any, settings: Any) -> None:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    big = json.dumps({"name": "big", "model_id": "x" * limit})
    body = assert_error(
        api.post("/instances", big, content_type="application/json"), 413, "REQUEST_TOO_LARGE"
    )
    assert str(limit) in body["error"]
    assert not Instance.objects.exists()
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = len(big) + 1  # read now, and refused for its length
    response = api.post("/instances", big, content_type="application/json")
    assert assert_error(response, 400, "VALIDATION_ERROR")["error"].startswith("model_id:")


def test_it_bounds_gpu_id_by_the_column_without_nvml(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gpu, "device_count", lambda: None)  # NVML absent: nothing to check against
    assert_error(create(api, name="huge", gpu_id=MAX_INT + 1), 400, "INVALID_GPU_ID")
    assert_error(create(api, name="huger", gpu_id=10**20), 400, "INVALID_GPU_ID")
    assert create(api, name="last", gpu_id=MAX_INT).status_code == 201
    assert Instance.objects.get().gpu_id == MAX_INT


def test_it_still_checks_gpu_id_against_nvml(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, [("A", 0, 1, 0)])
    assert_error(create(api, name="two", gpu_id=1), 400, "INVALID_GPU_ID")
    assert create(api, name="one", gpu_id=0).status_code == 201
