"""Traffic in the admin: the list's columns, the JSON behind the charts, who may read it,
and the fleet's samples (GPU memory from NVML, instances by status)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from instances import heartbeats, tasks
from instances.models import Instance
from telemetry import series
from telemetry.models import GpuSample, StatusSample, TrafficSample
from tests.fake_nvml import use_fake_gpus, use_no_nvml

pytestmark = pytest.mark.django_db

LIST = "/admin/instances/instance/"
TRAFFIC = "/admin/instances/instance/traffic/"
FLEET = "/admin/instances/instance/fleet-charts/"


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def make(name: str, port: int, **fields: Any) -> Instance:
    fields.setdefault("model_id", "org/model")
    return Instance.objects.create(name=name, port=port, prometheus_port=port + 1000, **fields)


def now_sample(instance: str, **fields: Any) -> None:
    values: dict[str, Any] = {"seconds": 10.0, "source": "a"}
    values.update(fields)
    TrafficSample.objects.create(instance=instance, at=series.aligned(time.time()), **values)


def test_the_list_shows_each_instance_s_newest_traffic(admin_client: Client) -> None:
    make("busy", 8100, status="running")
    make("quiet", 8101, status="running")
    now_sample("busy", calls=125, errors=5, tokens=40_000, queue_depth=7,
               latency={"40": 100, "60": 25})  # fmt: skip
    html = admin_client.get(LIST).content.decode()
    for header in ("Calls/s", "P50", "P95", "Errors/s", "Queue", "Tokens/s"):
        assert f"<span>{header}</span>" in html
    assert 'data-instance="busy" data-field="calls_per_sec">12<' in html
    assert 'data-instance="busy" data-field="errors_per_sec">0.5<' in html
    assert 'data-instance="busy" data-field="tokens_per_sec">4000<' in html
    assert 'data-instance="busy" data-field="queue_depth">7<' in html
    assert 'data-instance="busy" data-field="p50_ms">' in html and " ms<" in html
    assert 'data-instance="quiet" data-field="calls_per_sec">—<' in html  # no sample


def test_the_traffic_json_gives_current_values_for_live_js(admin_client: Client) -> None:
    now_sample("busy", calls=30, latency={"48": 30})
    body = admin_client.get(TRAFFIC).json()
    busy = body["instances"]["busy"]
    assert busy["calls_per_sec"] == 3.0 and busy["queue_depth"] == 0
    assert busy["p50_ms"] == pytest.approx(1000 * 10 ** (-4 + 47.5 / 16), rel=0.05)


def test_an_instance_s_charts_come_in_two_windows(admin_client: Client) -> None:
    instance = make("busy", 8100, status="running")
    now_sample("busy", calls=50)
    url = f"/admin/instances/instance/{instance.pk}/charts/"
    short = admin_client.get(url, {"window": "15m"}).json()
    day = admin_client.get(url, {"window": "24h"}).json()
    assert (short["step"], len(short["x"])) == (10, 90)
    assert (day["step"], len(day["x"])) == (300, 288)
    assert [c["id"] for c in short["charts"]] == ["calls", "latency", "tokens", "queue"]
    assert 5.0 in short["charts"][0]["series"][0]["values"]
    assert admin_client.get(url, {"window": "nonsense"}).json()["window"] == "15m"
    assert admin_client.get("/admin/instances/instance/99999/charts/").status_code == 404


def test_the_instance_page_and_the_index_hold_the_chart_panels(admin_client: Client) -> None:
    instance = make("busy", 8100)
    page = admin_client.get(f"/admin/instances/instance/{instance.pk}/change/").content.decode()
    assert 'id="tei-charts-15m"' in page and 'id="tei-charts-24h"' in page
    assert f"/admin/instances/instance/{instance.pk}/charts/?window=24h" in page
    assert "instances/vendor/uplot/uPlot.iife.min.js" in page and "instances/charts.js" in page
    index = admin_client.get("/admin/").content.decode()
    assert 'id="tei-fleet-charts-15m"' in index and f"{FLEET}?window=24h" in index
    assert 'data-fleet="calls_per_sec"' in index


def test_reading_traffic_needs_the_view_permission(client: Client, django_user_model: Any) -> None:
    instance = make("busy", 8100)
    urls = [TRAFFIC, FLEET, f"/admin/instances/instance/{instance.pk}/charts/"]
    for url in urls:
        assert client.get(url).status_code == 302  # to the login page
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    client.login(username="staff", password="pw")
    for url in urls:
        assert client.get(url).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_instance"))
    for url in urls:
        assert client.get(url).status_code == 200


def test_the_vendored_chart_library_is_served_from_the_project(admin_client: Client) -> None:
    from django.contrib.staticfiles import finders

    script = finders.find("instances/vendor/uplot/uPlot.iife.min.js")
    licence = finders.find("instances/vendor/uplot/LICENSE")
    assert script and licence
    assert "uPlot" in Path(script).read_text(encoding="utf-8")[:2000]
    assert "MIT License" in Path(licence).read_text(encoding="utf-8")


# -- the fleet's samples ------------------------------------------------------------------


def test_the_worker_samples_its_gpus_for_the_fleet_chart(
    monkeypatch: pytest.MonkeyPatch, admin_client: Client
) -> None:
    use_fake_gpus(monkeypatch, [("NVIDIA A10", 6 * 2**30, 24 * 2**30, 50),
                                ("NVIDIA A10", 2**30, 24 * 2**30, 0)])  # fmt: skip
    assert heartbeats.sample_gpus("node-a") == 2
    rows = list(GpuSample.objects.order_by("gpu").values_list("node", "gpu", "memory_used"))
    assert rows == [("node-a", 0, 6 * 2**30), ("node-a", 1, 2**30)]
    chart = admin_client.get(FLEET).json()["charts"][1]
    assert chart["id"] == "gpu-memory"
    assert [s["label"] for s in chart["series"]] == ["GPU 0 (NVIDIA A10)", "GPU 1 (NVIDIA A10)"]
    assert 6.0 in chart["series"][0]["values"]


def test_without_a_gpu_nothing_is_sampled(monkeypatch: pytest.MonkeyPatch) -> None:
    use_no_nvml(monkeypatch)
    assert heartbeats.sample_gpus("node-a") == 0
    assert not GpuSample.objects.exists()


def test_beat_samples_instances_by_status_and_prunes_the_day_old(admin_client: Client) -> None:
    make("a", 8100, status="running")
    make("b", 8101, status="running")
    make("c", 8102, status="failed")
    old = series.aligned(time.time()) - series.RETENTION_SECS - 60
    StatusSample.objects.create(at=old, status="running", count=9)
    GpuSample.objects.create(at=old, node="n", gpu=0, memory_used=1, memory_total=2)
    tasks.sample_fleet()
    tasks.sample_fleet()  # twice in one step: still one row per status
    counts = dict(StatusSample.objects.values_list("status", "count"))
    assert counts == {"pending": 0, "starting": 0, "running": 2, "stopping": 0, "stopped": 0,
                      "failed": 1}  # fmt: skip
    assert not GpuSample.objects.exists()
    chart = admin_client.get(FLEET).json()["charts"][2]
    assert [s["label"] for s in chart["series"]] == ["running", "failed"]
