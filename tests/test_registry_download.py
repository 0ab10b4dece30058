"""Model downloads through a real Celery worker and huggingface_hub's real download code,
against a local hub (tests/fake_hub.py) that serves a tiny model saved with transformers:
only the files an instance needs, progress in bytes, a cancel that keeps the partial
files and a download that resumes them, a failure that keeps its message, and the offline
default that refuses at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from registry.models import Model
from tests.conftest import SESSION_ID, Worker
from tests.fake_hub import SHA, FakeHub
from tests.localtei_fixtures import build_tiny_model
from tests.stack import wait_until

TINY_ID = "tiny-org/tiny-bert"
HUB_NODE = f"hub-{SESSION_ID}"


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[FakeHub]:
    model = build_tiny_model("embedding", tmp_path / "tiny")
    (model / "pytorch_model.bin").write_bytes(b"\0" * 4096)  # not for an instance: skipped
    (model / "README.md").write_text("# tiny\n")
    with FakeHub({TINY_ID: model}) as served:
        yield served


def status_of(api: APIClient, model_id: str, *statuses: str, timeout: float = 60) -> dict[str, Any]:
    def current() -> dict[str, Any] | None:
        body = api.get(f"/models/{model_id}").json()
        return body if body["status"] in statuses else None

    return wait_until(current, timeout, f"{model_id} to be {'/'.join(statuses)}")  # type: ignore[no-any-return]


def test_it_downloads_with_progress_cancels_resumes_and_fails_with_the_message(
    hub: FakeHub,
    tmp_path: Path,
    api: APIClient,
    settings: Any,
    start_worker: Callable[..., Worker],
) -> None:
    cache = tmp_path / "hf-cache"
    start_worker(HUB_NODE, TEI_MANAGER_HUB_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache))
    settings.NODE_NAME = HUB_NODE  # the download goes to that worker's queue
    wanted = sum(
        p.stat().st_size
        for p in hub.files(TINY_ID)
        if p.name not in ("pytorch_model.bin", "README.md")
    )
    assert api.post("/models", {"model_id": TINY_ID}, format="json").json()["status"] == "available"

    # A slow hub: the download is seen part done, then cancelled. Past 1.7 MB every small
    # file (0.7 MB) is in and the 3.9 MB weights are on their way (written by the MiB).
    hub.bytes_per_sec = 400_000
    assert api.post(f"/models/{TINY_ID}/download").status_code == 202
    partial = wait_until(
        lambda: Model.objects.filter(model_id=TINY_ID, bytes_done__gt=1_700_000).first(),
        60,
        "progress",
    )
    assert partial.status == "downloading" and partial.bytes_total == wanted
    assert 0 < partial.bytes_done < wanted
    assert api.post(f"/models/{TINY_ID}/cancel").json()["status"] == "downloading"
    cancelled = status_of(api, TINY_ID, "available", "downloaded", "failed")
    assert (cancelled["status"], cancelled["last_error"]) == ("available", "download cancelled")

    assert not list((cache / "models--tiny-org--tiny-bert" / "blobs").glob("*.incomplete"))

    # At full speed it fetches what it lacks (the weights) and ends downloaded.
    hub.bytes_per_sec = 0
    hub.requests.clear()
    assert api.post(f"/models/{TINY_ID}/download").status_code == 202
    done = status_of(api, TINY_ID, "downloaded", "failed")
    assert done["status"] == "downloaded", done["last_error"]
    assert done["bytes_done"] == done["bytes_total"] == wanted
    assert done["progress_percent"] == 100 and done["commit_sha"] == SHA
    fetched = [path.rsplit("/", 1)[-1] for method, path, _ in hub.requests if method == "GET"]
    assert [name for name in fetched if "/api/" not in name and "." in name] == [
        "model.safetensors"
    ]
    snapshot = cache / "models--tiny-org--tiny-bert" / "snapshots" / SHA
    names = sorted(p.name for p in snapshot.iterdir())
    assert names == sorted(
        p.name for p in hub.files(TINY_ID) if p.suffix != ".bin" and p.suffix != ".md"
    )
    assert done["size_on_disk"] == wanted

    # A repo the hub does not have: failed, with the hub's answer.
    api.post("/models", {"model_id": "org/missing"}, format="json")
    api.post("/models/org/missing/download")
    failed = status_of(api, "org/missing", "failed")
    assert "RepositoryNotFoundError" in failed["last_error"]


def test_downloads_are_off_while_offline_without_a_hub(
    manager_worker: Worker, api: APIClient
) -> None:
    api.post("/models", {"model_id": "org/elsewhere"}, format="json")
    assert api.post("/models/org/elsewhere/download").status_code == 202
    failed = status_of(api, "org/elsewhere", "failed", timeout=30)
    assert failed["last_error"].startswith("downloads are off: HF_HUB_OFFLINE=1")
