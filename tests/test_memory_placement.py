"""Memory-aware placement, with the fake NVML: a registered model's instance goes to the
GPU with the most free memory that fits, a GPU asked for is checked, no fit is 409
INSUFFICIENT_MEMORY with the figures, a host without GPUs checks its RAM, and an
on-demand start with evict_idle first stops the least recently used on-demand instance.
(The processes are not started here: the rows are what placement reads.)"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from instances import services
from instances.errors import InsufficientMemory
from instances.models import Instance
from registry.models import MARGIN_BYTES, Model
from registry.ondemand import ensure_instance
from tests.fake_nvml import use_fake_gpus, use_no_nvml

pytestmark = pytest.mark.django_db
GB = 10**9


def gpus(monkeypatch: pytest.MonkeyPatch, *cards: tuple[int, int]) -> None:
    use_fake_gpus(
        monkeypatch, [(f"GPU {i}", used, total, 0) for i, (used, total) in enumerate(cards)]
    )


def test_it_places_an_instance_on_the_gpu_with_the_most_free_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus(monkeypatch, (10 * GB, 16 * GB), (2 * GB, 16 * GB))
    Model.objects.create(model_id="org/m", memory_bytes=4 * GB)
    assert services.create_instance(name="a", model_id="org/m").gpu_id == 1
    # GPU 1 now holds a's estimate (its process is still loading): 12 GB free vs 6 GB,
    # then 8 GB vs 6 GB, then 4 GB vs 6 GB.
    assert services.create_instance(name="b", model_id="org/m").gpu_id == 1
    assert services.create_instance(name="c", model_id="org/m").gpu_id == 1
    assert services.create_instance(name="e", model_id="org/m").gpu_id == 0
    # A model the registry does not know keeps the old rule: no estimate, not placed.
    assert services.create_instance(name="d", model_id="org/unknown").gpu_id is None


def test_no_fit_is_insufficient_memory_with_the_figures(
    monkeypatch: pytest.MonkeyPatch, api: Any
) -> None:
    gpus(monkeypatch, (10 * GB, 16 * GB), (12 * GB, 16 * GB))
    Model.objects.create(model_id="org/big", memory_bytes=8 * GB)
    response = api.post("/instances", {"name": "x", "model_id": "org/big"}, format="json")
    body = response.json()
    assert response.status_code == 409 and body["code"] == "INSUFFICIENT_MEMORY", body
    assert body["details"] == {"needed_bytes": 8 * GB, "free_bytes": {"0": 6 * GB, "1": 4 * GB}}
    response = api.post(
        "/instances", {"name": "x", "model_id": "org/big", "gpu_id": 0}, format="json"
    )
    assert response.json()["details"] == {
        "needed_bytes": 8 * GB, "free_bytes": 6 * GB, "device": "gpu 0"
    }  # fmt: skip
    assert not Instance.objects.exists()


def test_a_host_without_gpus_checks_its_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    use_no_nvml(monkeypatch)
    Model.objects.create(model_id="org/small", memory_bytes=1)
    Model.objects.create(model_id="org/huge", memory_bytes=10**18)
    assert services.create_instance(name="s", model_id="org/small").gpu_id is None
    with pytest.raises(InsufficientMemory) as refused:
        services.create_instance(name="h", model_id="org/huge")
    assert refused.value.details is not None and refused.value.details["device"] == "cpu"


def test_the_estimate_without_a_measure_is_the_weights_times_the_dtype_plus_a_margin() -> None:
    half = Model(model_id="org/w", size_on_disk=GB, dtype="float16")
    assert half.memory_estimate == int(GB * 0.5 * 1.2) + MARGIN_BYTES
    assert Model(model_id="org/w", size_on_disk=GB, memory_bytes=7).memory_estimate == 7
    assert Model(model_id="org/w").memory_estimate is None


def test_an_on_demand_start_evicts_the_least_recently_used_on_demand_instance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gpus(monkeypatch, (0, 10 * GB))
    for model_id in ("org/a", "org/b"):
        Model.objects.create(model_id=model_id, memory_bytes=4 * GB, on_demand=True)
    Model.objects.create(model_id="org/c", memory_bytes=4 * GB, on_demand=True, evict_idle=True)
    Model.objects.create(model_id="org/d", memory_bytes=4 * GB, on_demand=True)
    now = timezone.now()
    for model_id, idle_minutes in (("org/a", 10), ("org/b", 1)):
        name = ensure_instance(model_id)
        Instance.objects.filter(name=name).update(
            status="running", last_call_at=now - timedelta(minutes=idle_minutes)
        )
    with pytest.raises(InsufficientMemory):
        ensure_instance("org/d")  # no evict_idle: refused, nothing stopped
    assert set(Instance.objects.values_list("status", flat=True)) == {"running"}
    name = ensure_instance("org/c")
    placed = Instance.objects.get(name=name)
    assert placed.gpu_id == 0 and placed.on_demand
    statuses = dict(Instance.objects.values_list("model_id", "status"))
    assert statuses == {"org/a": "stopping", "org/b": "running", "org/c": "pending"}
