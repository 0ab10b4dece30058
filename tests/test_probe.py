"""`python -m teimanager.probe`: the liveness probes docker/compose.yml runs, against real
processes: Django's live server for web, a multiplexer on a loopback port, and the beat
heartbeat in the database."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from instances.models import Heartbeat
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from teimanager.config import Config
from teimanager.probe import NotAlive, probe_beat, probe_multiplexer, probe_web
from tests.conftest import ROOT, TEST_ENV
from tests.localtei_fixtures import free_port


def config(**values: Any) -> Config:
    return dataclasses.replace(settings.TEI, bind="127.0.0.1", **values)


@pytest.mark.django_db(transaction=True)
def test_web_is_alive_when_health_answers_whatever_it_says(live_server: Any) -> None:
    port = int(live_server.url.rsplit(":", 1)[1])
    Heartbeat.objects.all().delete()  # /health may well answer 503 here: still alive
    assert "answered" in probe_web(config(api_port=port))


def test_web_is_not_alive_when_nothing_listens() -> None:
    with pytest.raises(NotAlive, match="does not answer"):
        probe_web(config(api_port=free_port()))


@pytest.mark.django_db(transaction=True)
def test_the_multiplexer_is_alive_while_it_serves() -> None:
    background = BackgroundMultiplexer(ServerOptions(host="127.0.0.1", port=0))
    port = background.start()
    try:
        assert "SERVING" in probe_multiplexer(config(grpc_port=port))
    finally:
        background.stop()
    with pytest.raises(NotAlive, match="does not answer"):
        probe_multiplexer(config(grpc_port=port))
    assert "disabled" in probe_multiplexer(config(grpc_port=port, grpc_enabled=False))


@pytest.mark.django_db
def test_beat_is_alive_while_its_heartbeat_is_fresh() -> None:
    Heartbeat.objects.update_or_create(name="beat", defaults={"last_seen": timezone.now()})
    assert "last heartbeat" in probe_beat(settings.TEI)
    old = timezone.now() - timedelta(minutes=5)
    Heartbeat.objects.filter(name="beat").update(last_seen=old)
    with pytest.raises(NotAlive, match="no heartbeat within"):
        probe_beat(settings.TEI)
    Heartbeat.objects.all().delete()
    with pytest.raises(NotAlive, match="never seen"):
        probe_beat(settings.TEI)


def test_the_command_says_why_in_one_line_and_exits_1() -> None:
    env = {**os.environ, **TEST_ENV, "TEI_MANAGER_API_PORT": str(free_port())}
    run = [sys.executable, "-m", "teimanager.probe"]
    result = subprocess.run(
        [*run, "web"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert result.stdout.startswith("web: not alive:") and len(result.stdout.splitlines()) == 1
    usage = subprocess.run(
        [*run, "worker"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert usage.returncode == 2 and "usage" in usage.stderr
