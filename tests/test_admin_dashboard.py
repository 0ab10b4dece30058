"""The admin index: fleet summary, GPU panel (NVML faked, or really absent), parts health."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from instances import dashboard, health
from instances.models import Heartbeat, Instance
from tests.fake_nvml import use_fake_gpus, use_no_nvml

pytestmark = pytest.mark.django_db

INDEX = "/admin/"
PANELS = "/admin/instances/instance/dashboard/"


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    use_fake_gpus(
        monkeypatch,
        [
            ("NVIDIA H100 80GB HBM3", 20 * 2**30, 80 * 2**30, 37),
            ("NVIDIA H100 80GB HBM3", 0, 80 * 2**30, 0),
        ],
    )


@pytest.fixture(autouse=True)
def fast_passwords(settings: Any) -> None:
    """admin_client's superuser would otherwise cost a second of PBKDF2 per test."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def beat(name: str, seen: datetime) -> None:
    # A session worker from other tests may have written this row already.
    Heartbeat.objects.update_or_create(name=name, defaults={"last_seen": seen})


def make(name: str, port: int, **fields: Any) -> Instance:
    fields.setdefault("model_id", "org/model")
    return Instance.objects.create(name=name, port=port, prometheus_port=port + 1000, **fields)


def test_it_requires_staff_login(client: Client, django_user_model: Any) -> None:
    for url in (INDEX, PANELS):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    django_user_model.objects.create_user("plain", password="pw")
    client.login(username="plain", password="pw")
    assert client.get(PANELS).status_code == 302


def test_it_counts_the_fleet_by_status_with_links_to_the_filtered_list(
    admin_client: Client,
) -> None:
    make("a", 8100, status="running")
    make("b", 8101, status="running")
    make("c", 8102, status="failed")
    summary = {s.status: s.count for s in dashboard.fleet_summary()}
    assert summary == {
        "pending": 0,
        "starting": 0,
        "running": 2,
        "stopping": 0,
        "stopped": 0,
        "failed": 1,
    }
    page = admin_client.get(INDEX).content.decode()
    changelist = reverse("admin:instances_instance_changelist")
    assert f'href="{changelist}?status__exact=running"' in page
    assert 'data-status-count="running">2<' in page
    assert 'data-status-count="failed">1<' in page
    assert 'data-status-count="total">3<' in page


def test_it_shows_each_gpu_with_memory_utilisation_and_pinned_instances(
    admin_client: Client, two_gpus: None
) -> None:
    make("on-zero", 8100, gpu_id=0, status="running")
    make("also-zero", 8101, gpu_id=0, status="stopped")
    make("ghost", 8102, gpu_id=5)
    panel = dashboard.gpu_panel()
    assert [g.name for g in panel.gpus] == ["NVIDIA H100 80GB HBM3"] * 2
    assert panel.gpus[0].memory_percent == 25
    assert [i.name for i in panel.gpus[0].instances] == ["also-zero", "on-zero"]
    assert panel.gpus[1].instances == []
    assert [i.name for i in panel.unplaced] == ["ghost"]

    page = admin_client.get(INDEX).content.decode()
    assert "NVIDIA H100 80GB HBM3" in page
    assert "20.0 / 80.0 GiB" in page
    assert "37%" in page
    assert "on-zero" in page and "none pinned" in page
    assert "Pinned to a GPU that NVML does not list" in page
    assert "No NVIDIA GPU detected" not in page


def test_it_says_no_gpu_detected_on_a_machine_without_one(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_no_nvml(monkeypatch)
    assert dashboard.gpu_panel().gpus == []
    assert "No NVIDIA GPU detected" in admin_client.get(INDEX).content.decode()


def test_it_reports_every_part_with_a_reason(admin_client: Client, settings: Any) -> None:
    parts = {p.name: p for p in dashboard.parts_health()}
    worker = f"Worker {settings.NODE_NAME}"
    assert list(parts) == ["Database", "Broker", "Beat", "Reconcile", worker, "Multiplexer"]
    assert parts["Database"].ok is True
    page = admin_client.get(INDEX).content.decode()
    for name in parts:
        assert f'<th scope="row">{name}</th>' in page


def test_it_counts_beat_and_reconcile_alive_from_fresh_heartbeats(admin_client: Client) -> None:
    beat("beat", timezone.now() - timedelta(seconds=2))
    beat("reconcile", timezone.now() - timedelta(seconds=2))
    parts = {p.name: p for p in dashboard.parts_health()}
    assert parts["Beat"].ok is True
    assert parts["Reconcile"].ok is True
    assert "last heartbeat 2s ago" in parts["Beat"].detail


def test_it_flags_a_stale_reconcile_heartbeat(
    admin_client: Client, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "PROCESS_STARTED_AT", timezone.now() - timedelta(hours=2))
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens
    beat("reconcile", timezone.now() - timedelta(hours=1))
    parts = {p.name: p for p in dashboard.parts_health()}
    assert parts["Broker"].ok is False
    assert "does not answer" in parts["Broker"].detail
    assert parts["Reconcile"].ok is False
    assert "last heartbeat 1\xa0hour ago" in parts["Reconcile"].detail
    assert "is a worker up" in parts["Reconcile"].detail


def test_it_says_the_multiplexer_is_disabled(settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, grpc_enabled=False)
    multiplexer = dashboard.parts_health()[-1]
    assert (multiplexer.name, multiplexer.ok) == ("Multiplexer", None)
    assert "disabled" in multiplexer.detail


def test_it_hides_the_broker_password(settings: Any) -> None:
    settings.CELERY_BROKER_URL = "redis://user:secret@127.0.0.1:1/0"
    broker = dashboard.parts_health()[1]
    assert "secret" not in broker.detail
    assert "redis://***@127.0.0.1:1/0" in broker.detail


def test_it_serves_the_panels_alone_for_the_live_refresh(admin_client: Client) -> None:
    make("a", 8100, status="running")
    response = admin_client.get(PANELS)
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="tei-fleet"' in body and 'id="tei-gpus"' in body and 'id="tei-health"' in body
    assert "<html" not in body
