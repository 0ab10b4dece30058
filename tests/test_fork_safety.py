"""A fork taken while another thread is inside SQLite poisons the child's SQLite: its
writes wait out the busy timeout and fail. The worker forks its embedded beat (and pool
processes) while its heartbeat thread writes, so that thread holds os.fork() off."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from instances import heartbeats

Guard = Callable[[], AbstractContextManager[object]]


def _fork_during_a_write(tmp_path: Path, guard: Guard) -> str:
    """A thread writes inside `guard()` while the main thread forks; the child then
    writes. Returns what the child reported."""
    path = tmp_path / "state.sqlite3"
    setup = sqlite3.connect(path)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE beats (n INTEGER)")
    setup.commit()
    setup.close()
    writing = threading.Event()

    def write() -> None:
        with guard():
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO beats VALUES (1)")
            writing.set()
            time.sleep(0.5)
            db.execute("COMMIT")
            db.close()

    thread = threading.Thread(target=write)
    thread.start()
    writing.wait(5)
    read, written = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's write is over by the time this writes
        time.sleep(0.8)
        try:
            db = sqlite3.connect(path, timeout=1, isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO beats VALUES (2)")
            db.execute("COMMIT")
            os.write(written, b"wrote")
        except sqlite3.Error as exc:
            os.write(written, str(exc).encode())
        os._exit(0)
    os.close(written)
    thread.join()
    os.waitpid(pid, 0)
    with os.fdopen(read, "rb") as pipe:
        return pipe.read().decode()


def test_a_fork_held_off_by_the_heartbeat_guard_leaves_the_child_a_working_database(
    tmp_path: Path,
) -> None:
    assert _fork_during_a_write(tmp_path, heartbeats.no_fork) == "wrote"


def test_without_the_guard_the_child_of_such_a_fork_cannot_write(tmp_path: Path) -> None:
    # Why the guard exists: this is SQLite's behaviour, and what the beat went through.
    assert _fork_during_a_write(tmp_path, nullcontext) == "database is locked"
