"""SECRET_KEY: the environment's when set, else one random key generated into the state
directory (mode 0600) that every process of the node agrees on."""

from __future__ import annotations

import multiprocessing
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from teimanager import secret_key
from tests.conftest import ROOT, TEST_ENV


def _load_after(barrier: Any, directory: str, results: Any) -> None:
    barrier.wait()
    results.put(secret_key.load_or_create(Path(directory)))


def test_it_generates_one_private_key_and_keeps_it(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    key = secret_key.load_or_create(directory)
    path = directory / secret_key.FILE_NAME
    assert len(key) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret_key.load_or_create(directory) == key
    assert secret_key.load_or_create(tmp_path / "other") != key
    assert [p.name for p in directory.iterdir()] == [secret_key.FILE_NAME]  # no leftovers


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(8), context.Queue()
    processes = [
        context.Process(target=_load_after, args=(barrier, str(tmp_path), results))
        for _ in range(8)
    ]
    for process in processes:
        process.start()
    keys = {results.get(timeout=30) for _ in processes}
    for process in processes:
        process.join(30)
    assert keys == {(tmp_path / secret_key.FILE_NAME).read_text().strip()}


def settings_key(state_file: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, **TEST_ENV, "TEI_MANAGER_STATE_FILE": str(state_file), **env}
    if "SECRET_KEY" not in env:
        environment.pop("SECRET_KEY", None)
    code = "import django; django.setup(); from django.conf import settings; "
    code += "print(settings.SECRET_KEY)"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True
    )


def test_settings_read_the_key_beside_the_state_file_unless_the_environment_sets_one(
    tmp_path: Path,
) -> None:
    state_file = tmp_path / "node" / "state.sqlite3"
    generated = settings_key(state_file)
    assert generated.returncode == 0, generated.stderr
    key = generated.stdout.strip()
    assert key == (tmp_path / "node" / secret_key.FILE_NAME).read_text().strip()
    assert settings_key(state_file).stdout.strip() == key  # the next start: the same key
    assert settings_key(state_file, SECRET_KEY="from-env").stdout.strip() == "from-env"


def test_it_says_where_it_could_not_write_the_key(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(secret_key.SecretKeyError, match="a-file"):
        secret_key.load_or_create(blocker / "state")
    result = settings_key(blocker / "state" / "state.sqlite3")
    assert result.returncode == 2
    assert "SECRET_KEY" in result.stderr and "a-file" in result.stderr
    assert "Traceback" not in result.stderr
