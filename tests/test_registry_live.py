"""The registry with real processes: verify loads a model in a throwaway localtei,
embeds a probe text and records what it measured; a model that cannot load ends failed
with the instance's own words. (On-demand starts: tests/test_on_demand.py.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil
from rest_framework.test import APIClient

from tests.conftest import Worker
from tests.localtei_fixtures import MINILM_ID
from tests.test_registry_download import status_of


def test_verify_measures_a_model_and_stops_its_instance(
    manager_worker: Worker, api: APIClient, tmp_path: Path
) -> None:
    # The worker registered the packaged model when it started (unless a test since
    # emptied the table).
    assert api.post("/models", {"model_id": MINILM_ID}, format="json").status_code in (201, 409)
    assert api.post(f"/models/{MINILM_ID}/verify").json()["status"] == "loading"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "bert"}')
    api.post("/models", {"model_id": str(broken)}, format="json")
    api.post(f"/models/{broken}/verify")

    verified = status_of(api, MINILM_ID, "verified", "failed", timeout=120)
    assert verified["status"] == "verified", verified["last_error"]
    assert verified["dimensions"] == 384 and verified["model_type"] == "embedding"
    assert verified["max_input_length"] > 0 and verified["load_time_secs"] > 0
    assert verified["memory_bytes"] > 50_000_000 and verified["verified_at"]

    failed: dict[str, Any] = status_of(api, str(broken), "verified", "failed", timeout=120)
    assert failed["status"] == "failed" and "exited while loading" in failed["last_error"]
    assert not _throwaway_instances_left(manager_worker)


def _throwaway_instances_left(worker: Worker) -> list[int]:
    """The localtei processes the worker's pool processes spawned that still run (no
    instance was created here: any would be a throwaway instance left behind)."""
    left = []
    for pool_process in psutil.Process(worker.pid).children():
        for child in pool_process.children(recursive=True):
            try:
                if "localtei" in " ".join(child.cmdline()):
                    left.append(child.pid)
            except psutil.Error:
                continue
    return left
