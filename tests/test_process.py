"""Instance processes: no shell, own process group, no orphans (the launch contract:
tests/test_launch.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil

from instances import logs, process
from instances.models import Instance


def make_instance(**fields: object) -> Instance:
    values: dict[str, object] = {"name": "p", "model_id": "org/model", "port": 8080}
    values |= {"prometheus_port": 9100, **fields}
    return Instance(**values)


def test_it_passes_arguments_verbatim_and_stops_the_whole_group(tmp_path: Path) -> None:
    marker = tmp_path / "injected"
    script = tmp_path / "router"
    # A router that starts a child of its own and prints its arguments.
    script.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        "print(sys.argv[1:], flush=True)\n"
        "subprocess.Popen(['sleep', '600'])\n"
        "time.sleep(600)\n"
    )
    script.chmod(0o755)
    instance = make_instance(
        name="group", model_id=f"m;touch {marker}", extra_args=[f"$(touch {marker})"]
    )
    spawned = process.spawn(instance, str(script), tmp_path)
    try:
        proc = psutil.Process(spawned.pid)
        deadline = time.monotonic() + 10
        while not proc.children() and time.monotonic() < deadline:
            time.sleep(0.05)
        [child] = proc.children()
        assert os.getpgid(spawned.pid) == spawned.pid != os.getpgid(0)
        assert process.is_alive(spawned.pid, spawned.create_time)
        assert not process.is_alive(spawned.pid, spawned.create_time + 5)
    finally:
        process.terminate(spawned.pid, spawned.create_time, 2)
    assert not process.is_alive(spawned.pid, spawned.create_time)
    deadline = time.monotonic() + 5
    while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the router's child outlived it"
        time.sleep(0.05)
    assert not marker.exists()
    log = (tmp_path / "group.log").read_text()
    assert f"'m;touch {marker}'" in log and f"'$(touch {marker})'" in log


def test_it_tails_the_log(tmp_path: Path) -> None:
    (tmp_path / "t.log").write_text("".join(f"{i}\n" for i in range(100)))
    assert logs.tail(tmp_path, "t", 3) == ["97", "98", "99"]
    assert logs.tail(tmp_path, "missing", 3) == []
