"""`/metrics`: the tei_manager_* series come from the database, so they are right whichever
process changed the state; GPU gauges from NVML (faked by tests/fake_nvml.py, or really
absent)."""

from __future__ import annotations

from typing import Any

import pytest

from instances import gpu, services
from instances.models import Instance, Status
from tests.fake_nvml import use_fake_gpus, use_no_nvml

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def scrape(api: Any) -> str:
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return str(response.content.decode())


def test_it_counts_instances_from_the_database(api: Any) -> None:
    services.create_instance(name="a", model_id="m")
    services.create_instance(name="b", model_id="m")
    services.create_instance(name="c", model_id="m")
    services.delete_instance("c")
    # Another process (a worker) records a restart and failed health checks.
    Instance.objects.filter(name="a").update(
        restarts=2, health_check_failures_total=5, status=Status.RUNNING
    )
    text = scrape(api)
    assert "tei_manager_instances_created_total 3.0" in text
    assert "tei_manager_instances_deleted_total 1.0" in text
    assert "tei_manager_instances_count 2.0" in text
    assert 'tei_manager_instance_restarts_total{instance="a"} 2.0' in text
    assert 'tei_manager_health_check_failures_total{instance="a"} 5.0' in text
    assert 'tei_manager_instances_by_status{status="running"} 1.0' in text
    assert 'tei_manager_instances_by_status{status="pending"} 1.0' in text
    assert 'tei_manager_instances_by_status{status="failed"} 0.0' in text
    assert "django_http_requests" in text  # django-prometheus's own series


def test_it_reports_gpus_from_nvml(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(monkeypatch, [("NVIDIA H100", 1024, 8192, 40), ("NVIDIA H100", 2048, 8192, 41)])
    text = scrape(api)
    assert 'tei_manager_gpu_memory_used_bytes{gpu="1",name="NVIDIA H100"} 2048.0' in text
    assert 'tei_manager_gpu_memory_total_bytes{gpu="0",name="NVIDIA H100"} 8192.0' in text
    assert 'tei_manager_gpu_utilization_percent{gpu="0",name="NVIDIA H100"} 40.0' in text


def test_it_has_no_gpu_series_without_nvml(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    use_no_nvml(monkeypatch)
    assert gpu.device_count() is None
    assert "tei_manager_gpu_" not in scrape(api)
