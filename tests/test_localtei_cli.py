"""`python -m localtei` as a process: flags, start-up failures, logs, shutdown."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.localtei_fixtures import (
    MINILM_ID,
    REPO_ROOT,
    free_port,
    launch_localtei,
    localtei_env,
)


def run_localtei(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localtei", *args],
        cwd=REPO_ROOT,
        env=localtei_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_it_rejects_an_unknown_flag_naming_it() -> None:
    result = run_localtei("--model-id", MINILM_ID, "--no-such-flag", "1")
    assert result.returncode != 0
    assert "--no-such-flag" in result.stderr


def test_it_rejects_a_pooling_tei_does_not_have() -> None:
    result = run_localtei("--pooling", "max")
    assert result.returncode != 0
    assert "--pooling" in result.stderr


def test_it_fails_fast_with_one_clear_line_when_the_model_is_missing() -> None:
    started = time.monotonic()
    result = run_localtei("--model-id", "nobody/no-such-model", "--port", str(free_port()))
    assert result.returncode == 1
    assert time.monotonic() - started < 20  # no torch import, no model load
    lines = (result.stdout + result.stderr).strip().splitlines()
    (error,) = [line for line in lines if "ERROR" in line]
    assert "model 'nobody/no-such-model' not found" in error
    assert "Hugging Face cache" in error and "packaged" in error


def test_it_fails_the_start_when_splade_pooling_has_no_mlm_head() -> None:
    result = run_localtei(
        "--model-id", MINILM_ID, "--pooling", "splade", "--port", str(free_port())
    )
    assert result.returncode == 1
    (error,) = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert "ForMaskedLM" in error


def test_it_fails_the_start_when_the_directory_holds_no_model(tmp_path: Path) -> None:
    result = run_localtei("--model-id", str(tmp_path), "--json-output", "--port", str(free_port()))
    assert result.returncode == 1
    assert '"level": "ERROR"' in result.stdout and "config.json" in result.stdout


@pytest.mark.parametrize(("setting", "loop"), [("", "uvloop"), ("asyncio", "asyncio")])
def test_it_exits_0_on_sigterm_even_while_loading_the_model(
    setting: str, loop: str, tmp_path: Path
) -> None:
    # Every server started with start_localtei() is also checked to exit 0 once Ready.
    # torch takes seconds to import: a load long enough to be caught in the act.
    # On either event loop (LOCALTEI_LOOP; unset: uvloop, which is installed here).
    server = launch_localtei(
        MINILM_ID,
        "--backend",
        "torch",
        log_path=tmp_path / "localtei.log",
        env=localtei_env(LOCALTEI_LOOP=setting),
    )
    try:
        deadline = time.monotonic() + 60
        while "NOT_SERVING" not in server.health_seen and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):  # we want the NOT_SERVING phase
                server.wait_until_serving(timeout=0.2)
        assert server.health_seen[-1] == "NOT_SERVING", server.log_text()
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 10
    finally:
        server.stop()
    assert "Signal received while loading the model" in server.log_text()
    assert f"({loop} event loop)" in server.log_text()


def test_an_unknown_event_loop_fails_the_start_with_one_line(tmp_path: Path) -> None:
    env = localtei_env(LOCALTEI_LOOP="fast")
    server = launch_localtei(MINILM_ID, env=env, log_path=tmp_path / "log", prepare=False)
    assert server.proc.wait(60) == 1
    log = (tmp_path / "log").read_text()
    assert "LOCALTEI_LOOP: unknown event loop 'fast': choose one of auto, uvloop, asyncio" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("flag", ["--otlp-endpoint", "--api-key", "--uds-path", "--revision"])
def test_it_accepts_teis_other_flags(flag: str) -> None:
    from localtei.cli import parse_args

    assert parse_args([flag, "value"]).model_id == MINILM_ID


def test_it_names_a_model_without_the_hosts_paths(tmp_path: Path) -> None:
    # A directory that holds no model, named relative to the working directory: the error
    # names it as given, not by its absolute path.
    result = run_localtei("--model-id", "tests", "--port", str(free_port()))
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "model 'tests' is not loadable: no readable config.json" in output
    assert str(REPO_ROOT) not in output
    # Nowhere to be found: the cache is named by the setting that chose it.
    env = {**localtei_env(), "HF_HOME": str(tmp_path / "hf-home")}
    missing = subprocess.run(
        [sys.executable, "-m", "localtei", "--model-id", "org/absent", "--port", str(free_port())],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Hugging Face cache (HF_HOME/hub, offline)" in missing.stdout + missing.stderr
    assert str(tmp_path) not in missing.stdout + missing.stderr
