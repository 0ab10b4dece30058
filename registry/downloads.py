"""The download task's work: run `python -m registry.fetch` as a child, turn its progress
into bytes_done/bytes_total on the row (the bytes of the repo's folder in the cache, so
that a resumed download counts what it had), and stop it when asked.

The child is watched every half second: a cancel (`cancel_requested`), a row that was
deleted or claimed again, or download_timeout_secs stops it (SIGTERM to its group, then
SIGKILL). The files it completed stay in the cache and the next download skips them; the
file it was writing is removed (huggingface_hub starts a partial file again).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from django.conf import settings

from instances import process
from instances.launch import BASE_DIR
from registry.models import Model, ModelStatus
from registry.services import directory_size

log = logging.getLogger(__name__)

POLL_SECS = 0.5
CANCELLED = "download cancelled"


def run(pk: int, token: str) -> None:
    model = Model.objects.filter(pk=pk, status=ModelStatus.DOWNLOADING, task_token=token).first()
    if model is None:
        return  # cancelled, deleted or claimed again before it began
    repo_dir = repo_cache_dir(model.model_id)
    _remove_partial_files(repo_dir)
    command = [sys.executable, "-m", "registry.fetch", model.model_id]
    command += ["--revision", model.revision or "main"]
    child = subprocess.Popen(  # noqa: S603 - argv list, no shell
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        cwd=BASE_DIR,
        start_new_session=True,
    )
    events: dict[str, Any] = {}
    errors: list[str] = []
    readers = [
        threading.Thread(target=_read_events, args=(child.stdout, events), daemon=True),
        threading.Thread(target=_read_lines, args=(child.stderr, errors), daemon=True),
    ]
    for reader in readers:
        reader.start()
    outcome = _watch(model, child, events, repo_dir)
    for reader in readers:
        reader.join(5)
    _remove_partial_files(repo_dir)
    _finish(model, child, outcome, events, errors)


def repo_cache_dir(model_id: str) -> Path:
    """The model's folder in this host's Hugging Face cache (HF_HUB_CACHE)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=model_id, repo_type="model")


def child_env() -> dict[str, str]:
    """The worker's environment, pointed at `hub_endpoint` when one is set (an explicit
    hub: huggingface_hub's offline switch does not apply to it)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BASE_DIR), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1")
    endpoint = settings.TEI.hub_endpoint
    if endpoint:
        env.update(HF_ENDPOINT=endpoint.rstrip("/"), HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
    return env


def recover(node: str) -> None:
    """At worker start: a download or check whose worker died will never finish."""
    Model.objects.filter(node=node, status__in=ModelStatus.busy()).update(
        status=ModelStatus.FAILED, last_error="interrupted: the worker stopped during the task"
    )


def _watch(
    model: Model, child: subprocess.Popen[str], events: dict[str, Any], repo_dir: Path
) -> str:
    """'exited', 'cancelled', 'gone' (row deleted or claimed again) or 'timeout'."""
    deadline = time.monotonic() + settings.TEI.download_timeout_secs
    last_written = -1
    while child.poll() is None:
        time.sleep(POLL_SECS)
        row = (
            Model.objects.filter(pk=model.pk)
            .values("status", "task_token", "cancel_requested")
            .first()
        )
        if (
            row is None
            or row["status"] != ModelStatus.DOWNLOADING
            or row["task_token"] != model.task_token
        ):
            _stop(child)
            return "gone"
        if row["cancel_requested"]:
            _stop(child)
            return "cancelled"
        if time.monotonic() > deadline:
            _stop(child)
            return "timeout"
        if "total" in events:
            done = min(_bytes_in(repo_dir), events["total"])
            if done != last_written:
                Model.objects.filter(pk=model.pk, task_token=model.task_token).update(
                    bytes_done=done, bytes_total=events.get("total")
                )
                last_written = done
    return "exited"


def _finish(
    model: Model,
    child: subprocess.Popen[str],
    outcome: str,
    events: dict[str, Any],
    errors: list[str],
) -> None:
    downloading = [ModelStatus.DOWNLOADING]
    if outcome == "gone":
        return
    if outcome == "cancelled":
        model.transition(downloading, ModelStatus.AVAILABLE, same_task=True, last_error=CANCELLED)
        log.info("model %s: %s", model.model_id, CANCELLED)
        return
    if outcome == "timeout":
        reason = f"not done within download_timeout_secs={settings.TEI.download_timeout_secs}"
    elif child.returncode == 0 and "path" in events:
        size = directory_size(events["path"])
        if model.transition(
            downloading,
            ModelStatus.DOWNLOADED,
            same_task=True,
            bytes_done=events.get("total") or size,
            bytes_total=events.get("total") or size,
            size_on_disk=size,
            commit_sha=events.get("sha", ""),
            last_error="",
        ):
            log.info("model %s: downloaded (%d bytes)", model.model_id, size)
        return
    else:
        reason = (errors[-1] if errors else "") or f"the download exited with {child.returncode}"
    model.transition(downloading, ModelStatus.FAILED, same_task=True, last_error=reason)
    log.warning("model %s: download failed: %s", model.model_id, reason)


def _bytes_in(repo_dir: Path) -> int:
    """What the repo's blobs hold now, partial ones (`.incomplete`) included."""
    return directory_size(repo_dir / "blobs") if (repo_dir / "blobs").is_dir() else 0


def _remove_partial_files(repo_dir: Path) -> None:
    for partial in (repo_dir / "blobs").glob("*.incomplete"):
        partial.unlink(missing_ok=True)


def _stop(child: subprocess.Popen[str]) -> None:
    process.terminate(child.pid, None, 5.0)
    try:
        child.wait(5)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _read_events(stream: Any, events: dict[str, Any]) -> None:
    for line in stream:
        try:
            events.update(json.loads(line))
        except ValueError:
            continue


def _read_lines(stream: Any, lines: list[str]) -> None:
    for line in stream:
        if line.strip():
            lines.append(line.strip())
