"""System checks: instances.E001 (no instance server), E002 (no broker), E003 (a bad seed)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from unittest import mock

from instances.checks import check_broker, check_instance_binary, check_seeds


def test_it_is_quiet_when_localtei_is_importable(settings: Any) -> None:
    assert check_instance_binary(None) == []


def test_it_accepts_an_executable_tei_binary(settings: Any, tmp_path: Path) -> None:
    binary = tmp_path / "text-embeddings-router"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(binary))
    with mock.patch("importlib.util.find_spec", return_value=None):
        assert check_instance_binary(None) == []


def test_it_reports_e001_without_binary_and_localtei(settings: Any, tmp_path: Path) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(tmp_path / "missing"))
    with mock.patch("importlib.util.find_spec", return_value=None):
        [error] = check_instance_binary(None)
    assert error.id == "instances.E001"
    assert "TEI_BINARY_PATH" in error.msg


def test_it_warns_when_tei_binary_path_is_not_executable(settings: Any, tmp_path: Path) -> None:
    settings.TEI = dataclasses.replace(settings.TEI, tei_binary_path=str(tmp_path / "missing"))
    [warning] = check_instance_binary(None)
    assert warning.id == "instances.W001"


def test_it_reports_e002_without_a_broker(settings: Any) -> None:
    settings.CELERY_BROKER_URL = ""
    [error] = check_broker(None)
    assert error.id == "instances.E002"
    assert "CELERY_BROKER_URL" in error.msg
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    assert check_broker(None) == []


def test_it_reports_e003_for_a_seed_the_create_api_would_refuse(settings: Any) -> None:
    good = {"name": "a", "model_id": "m", "auto_truncate": False}
    settings.TEI = dataclasses.replace(settings.TEI, instances=(good,))
    assert check_seeds(None) == []
    bad = {"name": "b", "model_id": "m", "extra_args": ["--port=1"]}
    settings.TEI = dataclasses.replace(settings.TEI, instances=(good, bad))
    [error] = check_seeds(None)
    assert error.id == "instances.E003"
    expected = "config key 'instances[1].extra_args': --port is set by the manager"
    assert error.msg.startswith(expected)
