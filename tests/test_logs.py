"""Instance logs: the log pipe rotates by size, keeps N backups and loses no line, also on
SIGTERM; the reader serves any slice of a large, rotated log from bounded reads."""

from __future__ import annotations

import os
import re
import signal
import socket
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from instances import logs, process
from instances.models import Instance
from tests.conftest import FAKE_TEI, wait_until

LINE = re.compile(r"line (\d{6}) x+$")


def chatty(tmp_path: Path, lines: int, max_bytes: int, backups: int) -> process.Spawned:
    """Start the fake router that writes `lines` numbered lines, then serves."""
    with socket.socket() as one, socket.socket() as two:
        one.bind(("127.0.0.1", 0))
        two.bind(("127.0.0.1", 0))
        ports = one.getsockname()[1], two.getsockname()[1]
    instance = Instance(
        name="chatty", model_id=f"chatty/{lines}", port=ports[0], prometheus_port=ports[1]
    )
    return process.spawn(instance, str(FAKE_TEI), tmp_path, max_bytes, backups)


def stop_like_a_service_manager(spawned: process.Spawned) -> None:
    """SIGTERM to the log pipe and the instance at once (systemd stops a unit so), then the
    usual stop."""
    os.kill(os.getsid(spawned.pid), signal.SIGTERM)
    process.terminate(spawned.pid, spawned.create_time, 10)


def whole_log(tmp_path: Path) -> list[str]:
    return [
        line for path in logs.files(tmp_path, "chatty") for line in path.read_text().split("\n")
    ]


def numbers(lines: list[str]) -> list[int]:
    return [int(match[1]) for line in lines if (match := LINE.match(line))]


def wait_for_line(tmp_path: Path, text: str) -> None:
    wait_until(lambda: any(text in line for line in whole_log(tmp_path)), 30, text)


def test_it_rotates_by_size_and_loses_no_line(tmp_path: Path) -> None:
    # 3000 lines of 52 bytes (156 kB): five files of 32 KiB, within 1 + 5 files.
    spawned = chatty(tmp_path, 3000, max_bytes=32 * 1024, backups=5)
    wait_for_line(tmp_path, "Ready on")
    stop_like_a_service_manager(spawned)

    files = logs.files(tmp_path, "chatty")
    assert [path.name for path in files] == [
        f"chatty.log.{n}" for n in range(len(files) - 1, 0, -1)
    ] + ["chatty.log"]
    assert 4 <= len(files) - 1 <= 5, [path.name for path in files]
    for path in files:
        data = path.read_bytes()
        assert len(data) <= 32 * 1024 and data.endswith(b"\n"), path.name
    lines = [line for line in whole_log(tmp_path) if line]
    assert numbers(lines) == list(range(1, 3001))
    # The instance's last words, written after the SIGTERM, and its exit after them.
    assert lines[-2] == "stopped after 3000 lines"
    assert "instance exited with code 0" in lines[-1]


def test_it_keeps_at_most_n_backups_and_drops_only_the_oldest_lines(tmp_path: Path) -> None:
    # 10000 lines (520 kB) into 4 files of 32 KiB: the oldest go, the rest stay in order.
    spawned = chatty(tmp_path, 10000, max_bytes=32 * 1024, backups=3)
    wait_for_line(tmp_path, "Ready on")
    stop_like_a_service_manager(spawned)

    names = [path.name for path in logs.files(tmp_path, "chatty")]
    assert names == ["chatty.log.3", "chatty.log.2", "chatty.log.1", "chatty.log"]
    kept = numbers(whole_log(tmp_path))
    assert kept == list(range(kept[0], 10001)) and kept[0] > 1
    assert 3 * 32 * 1024 // 52 < len(kept) < 4 * 32 * 1024 // 52


def test_the_log_pipe_ends_with_its_instance(tmp_path: Path) -> None:
    spawned = chatty(tmp_path, 1, max_bytes=0, backups=0)
    pipe = os.getsid(spawned.pid)
    assert pipe != spawned.pid and os.getpgid(spawned.pid) == spawned.pid
    wait_for_line(tmp_path, "line 000001")
    os.kill(spawned.pid, signal.SIGKILL)
    wait_until(lambda: not process.is_alive(pipe, None), 10, "the log pipe to exit")
    process.reap_children()
    assert "instance killed by signal 9" in whole_log(tmp_path)[-2]


def test_it_reports_a_binary_it_cannot_run(tmp_path: Path) -> None:
    broken = tmp_path / "router"
    broken.write_text("#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    instance = Instance(name="broken", model_id="m", port=1, prometheus_port=2)
    with pytest.raises(OSError) as raised:
        process.spawn(instance, str(broken), tmp_path)
    assert raised.value.filename == str(broken)
    assert "No such file or directory" in str(raised.value)
    wait_until(lambda: "cannot run" in (tmp_path / "broken.log").read_text(), 10)


@pytest.fixture
def rotated(tmp_path: Path) -> list[str]:
    """Three files as the log pipe leaves them, one with a last line without its end."""
    (tmp_path / "r.log.2").write_bytes(b"a0\na1\r\na2\n")
    (tmp_path / "r.log.1").write_bytes(b"b0\n\nb2 \xff\nb3-no-end")
    (tmp_path / "r.log").write_bytes(b"c0\nc1\nc2\nc3\n")
    return ["a0", "a1", "a2", "b0", "", "b2 \ufffd", "b3-no-end", "c0", "c1", "c2", "c3"]


def test_it_slices_a_rotated_log_like_a_python_list(tmp_path: Path, rotated: list[str]) -> None:
    bounds = [None, *range(-14, 15)]
    for start in bounds:
        for end in bounds:
            got = logs.read(tmp_path, "r", start, end)
            first, last, _ = slice(start, end).indices(len(rotated))
            expected = {
                "lines": rotated[start:end],
                "start": first,
                "end": max(first, last),
                "total_lines": len(rotated),
            }
            assert got == expected, (start, end)
    empty = {"lines": [], "start": 0, "end": 0, "total_lines": 0}
    assert logs.read(tmp_path, "missing", -100) == empty


def test_it_caps_a_reply_and_says_where_it_stopped(
    tmp_path: Path, rotated: list[str], monkeypatch: Any
) -> None:
    monkeypatch.setattr(logs, "MAX_LINES", 4)
    assert logs.read(tmp_path, "r", 2) == {
        "lines": rotated[2:6], "start": 2, "end": 6, "total_lines": 11,
    }  # fmt: skip
    # The next page starts where this one ended; appended lines are counted.
    with (tmp_path / "r.log").open("a") as fh:
        fh.write("c4\n")
    assert logs.read(tmp_path, "r", 6, 8)["lines"] == rotated[6:8]
    assert logs.read(tmp_path, "r", -1) == {
        "lines": ["c4"],
        "start": 11,
        "end": 12,
        "total_lines": 12,
    }


def test_it_reads_the_end_of_a_large_log_without_loading_it(tmp_path: Path) -> None:
    block = "".join(f"{i:09d} {'y' * 89}\n" for i in range(10_000)).encode()  # 100 bytes a line
    with (tmp_path / "big.log").open("wb") as fh:
        for _ in range(40):  # 40 MB, 400,000 lines
            fh.write(block)

    tracemalloc.start()
    try:
        reply = logs.read(tmp_path, "big", start=-100)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply["total_lines"] == 400_000 and reply["start"] == 399_900
    assert reply["lines"] == [f"{i:09d} {'y' * 89}" for i in range(9_900, 10_000)]
    assert peak < 4 * 1024 * 1024, peak

    # Once counted, the file is not read again: only what was appended, and the tail.
    with (tmp_path / "big.log").open("a") as fh:
        fh.write("appended\n")
    before = bytes_read()
    reply = logs.read(tmp_path, "big", start=-100)
    assert bytes_read() - before < 2 * 1024 * 1024
    assert reply["total_lines"] == 400_001 and reply["lines"][-1] == "appended"


def bytes_read() -> int:
    """Bytes this process has read through read(2) and friends."""
    text = Path("/proc/self/io").read_text()
    return int(re.search(r"^rchar: (\d+)$", text, re.M)[1])  # type: ignore[index]
