"""`/health` judges heartbeats: beat, reconcile, each node's worker, the multiplexer; a
stale one, or a database that does not answer, is a 503 naming it. The admin's health
panel shows the same verdict. Heartbeats come from real processes (the session worker with
its embedded beat, a worker started and killed here) or are written with old times."""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone

from instances import dashboard, health
from instances.heartbeats import WORKER_HEARTBEAT_SECS, worker_name
from instances.models import Heartbeat, Instance
from tests.conftest import TEST_NODE, wait_until

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

LONG_AGO = timedelta(hours=1)
WORKER = worker_name(TEST_NODE)


def beat(name: str, age: timedelta = timedelta(0)) -> None:
    Heartbeat.objects.update_or_create(name=name, defaults={"last_seen": timezone.now() - age})


def beat_all(**ages: timedelta) -> None:
    for name in ("beat", "reconcile", "multiplexer", WORKER):
        beat(name, ages.get(name.split(".")[0], timedelta(0)))


@pytest.fixture(autouse=True)
def up_for_an_hour(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process has run long past every limit: nothing counts as starting."""
    monkeypatch.setattr(health, "PROCESS_STARTED_AT", timezone.now() - LONG_AGO)


def test_it_is_ok_when_every_heartbeat_is_fresh(api: Any) -> None:
    beat_all()
    response = api.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["database"], body["stale"]) == ("ok", "ok", [])
    assert set(body["heartbeats"]) == {"beat", "reconcile", "multiplexer", WORKER}
    assert all(seen.endswith("Z") for seen in body["heartbeats"].values())


@pytest.mark.parametrize("part", ["beat", "reconcile", "multiplexer", "worker"])
def test_it_answers_503_naming_the_stale_part(api: Any, part: str) -> None:
    beat_all(**{part: LONG_AGO})
    response = api.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["stale"] == [WORKER if part == "worker" else part]
    assert set(body) >= {"status", "database", "heartbeats", "stale"}


def test_it_judges_against_the_health_interval(api: Any, settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, health_check_interval_secs=10)
    beat_all(beat=timedelta(seconds=30), reconcile=timedelta(seconds=30))
    assert api.get("/health").status_code == 200  # 3 x 10 s + 5 s: not yet
    beat_all(beat=timedelta(seconds=40))
    assert api.get("/health").json()["stale"] == ["beat"]


def test_the_multiplexer_has_its_own_limit_and_none_when_disabled(api: Any, settings: Any) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, health_check_interval_secs=60)
    beat_all(multiplexer=timedelta(seconds=25))  # 3 x 5 s + 5 s
    assert api.get("/health").json()["stale"] == ["multiplexer"]
    settings.TEI = dataclasses.replace(settings.TEI, grpc_enabled=False)
    assert api.get("/health").status_code == 200


def test_it_expects_a_worker_on_every_node_with_instances(api: Any) -> None:
    beat_all()
    Instance.objects.create(name="far", model_id="m", port=8100, prometheus_port=9100, node="far")
    body = api.get("/health").json()
    assert body["stale"] == [worker_name("far")]
    assert body["heartbeats"][worker_name("far")] is None
    beat(worker_name("far"))
    assert api.get("/health").status_code == 200


def test_a_part_never_seen_is_starting_until_the_process_outlives_its_limit(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    Heartbeat.objects.all().delete()
    monkeypatch.setattr(health, "PROCESS_STARTED_AT", timezone.now() - timedelta(seconds=2))
    young = api.get("/health")
    assert young.status_code == 200
    assert young.json()["stale"] == []
    assert set(young.json()["starting"]) == {"beat", "reconcile", "multiplexer", WORKER}
    monkeypatch.setattr(health, "PROCESS_STARTED_AT", timezone.now() - timedelta(seconds=60))
    old = api.get("/health")
    assert old.status_code == 503
    assert set(old.json()["stale"]) == {"beat", "reconcile", "multiplexer", WORKER}
    assert old.json()["heartbeats"]["beat"] is None


def test_a_heartbeat_from_before_a_restart_counts_as_starting_then_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    beat_all(beat=timedelta(minutes=10))
    now = timezone.now()
    assert health.evaluate(now, up_since=now - timedelta(seconds=3)).starting == ["beat"]
    assert health.evaluate(now, up_since=now - timedelta(minutes=5)).stale == ["beat"]


@pytest.mark.django_db(transaction=True)
def test_it_answers_503_when_the_database_does_not_answer(
    api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beat_all()
    connection.close()
    # A database file that cannot be opened (its directory does not exist), or, on
    # PostgreSQL, a database that does not exist.
    sqlite = connection.vendor == "sqlite"
    gone = str(tmp_path / "gone" / "db.sqlite3") if sqlite else "test_teimanager_gone"
    monkeypatch.setitem(connection.settings_dict, "NAME", gone)
    try:
        response = api.get("/health")
        verdict = health.evaluate()
    finally:
        connection.close()
        monkeypatch.undo()
    assert response.status_code == 503
    assert response.json()["database"] == "unavailable"
    assert response.json()["status"] == "unhealthy"
    reason = "unable to open database file" if sqlite else 'database "test_teimanager_gone"'
    assert reason in verdict.database_error


@pytest.mark.parametrize("stale", [(), ("beat",), ("reconcile", "multiplexer"), ("worker",)])
def test_the_admin_panel_agrees_with_health(api: Any, stale: tuple[str, ...]) -> None:
    beat_all(**dict.fromkeys(stale, LONG_AGO))
    body = api.get("/health").json()
    lines = {line.name: line for line in dashboard.parts_health()}
    down = {name for name, line in lines.items() if line.ok is False and name != "Broker"}
    labels = {"beat": "Beat", "reconcile": "Reconcile", "multiplexer": "Multiplexer"}
    assert down == {labels.get(name, f"Worker {TEST_NODE}") for name in body["stale"]}
    assert {name for name, line in lines.items() if line.ok} >= {"Database"}
    for name in down:
        assert "stale after" in lines[name].detail


def test_a_long_node_name_still_fits_the_heartbeat_table() -> None:
    long_node = "n" * 200
    name = worker_name(long_node)
    assert len(name) <= 64 and name.startswith("worker.nnn")
    assert name != worker_name("n" * 199)
    assert worker_name("gpu-1") == "worker.gpu-1"


@pytest.mark.django_db(transaction=True)
def test_real_worker_beat_and_tick_keep_health_ok(
    manager_worker: Any, api: Any, settings: Any
) -> None:
    """The session worker (with its embedded beat, ticking every second) writes `beat`,
    `reconcile` and its own `worker.<node>`; nothing is written by hand here."""
    settings.TEI = dataclasses.replace(settings.TEI, grpc_enabled=False)

    def fresh() -> bool:
        verdict = health.evaluate()
        return {p.name for p in verdict.parts if p.state == health.OK} == {
            "beat",
            "reconcile",
            WORKER,
        }

    wait_until(fresh, 60, "beat, reconcile and the worker to write heartbeats")
    assert api.get("/health").status_code == 200


@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_stops_its_heartbeat_and_turns_stale(start_worker: Any) -> None:
    node = "crashing-node"
    worker = start_worker(node)
    name = worker_name(node)

    def seen() -> datetime | None:
        return Heartbeat.objects.filter(name=name).values_list("last_seen", flat=True).first()

    first = wait_until(seen, 60, "the worker's first heartbeat")
    wait_until(lambda: (seen() or first) > first, 30, "a second heartbeat")
    worker.kill()
    last = seen()
    assert last is not None
    time.sleep(WORKER_HEARTBEAT_SECS + 1)  # one more heartbeat was due
    assert seen() == last
    # Judged once its node has instances; stale once the limit has passed.
    Instance.objects.create(
        name="there", model_id="m", port=8101, prometheus_port=9101, node=node,
        status="stopped", desired_state="stopped",
    )  # fmt: skip
    assert name not in health.evaluate().stale
    later = last + timedelta(seconds=health.stale_after(WORKER_HEARTBEAT_SECS) + 1)
    assert name in health.evaluate(now=later).stale
