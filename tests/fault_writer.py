"""The concurrent SQLite writers of the fault suite (tests/fault_scenarios.py): the
lifecycle service, called from WRITERS threads at once, each with its own database
connection, on a node no worker serves (so nothing but the writers changes the rows).

    python -m tests.fault_writer WRITERS

It first creates the two rows every writer contends for, then starts the writers together
and prints one JSON line: {"seconds": how long they took together, "writers": per writer,
a list of [operation, name, outcome, seconds]}, an outcome being "ok", an error code the
API would answer (ALREADY_RUNNING, ...), or "unexpected <type>: <message>" for anything
else ("database is locked" would be one).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

ROUNDS = 4  # creates per writer; every other one is stopped, the first deleted
SHARED, PARKED = "shared", "parked"  # restarted by every writer / started by every writer
DEAD_PID = 2**22 + 7  # above Linux's pid_max: no live process has it


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        sys.stderr.write(__doc__ or "")
        return 2
    import django

    django.setup()
    setup()
    writers = int(argv[0])
    results: list[list[list[Any]]] = [[] for _ in range(writers)]
    together = threading.Barrier(writers)
    threads = [
        threading.Thread(target=_writer, args=(index, together, results[index]))
        for index in range(writers)
    ]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - began
    print(json.dumps({"seconds": took, "writers": results}), flush=True)
    return 0


def setup() -> None:
    from instances import services
    from instances.models import DesiredState, Instance, Status

    services.create_instance(name=SHARED, model_id="m")
    services.create_instance(name=PARKED, model_id="m")
    # `shared` ran a process (a restart counts it once); `parked` was stopped by hand.
    Instance.objects.filter(name=SHARED).update(
        status=Status.RUNNING, pid=DEAD_PID, process_started_at=1.0
    )
    Instance.objects.filter(name=PARKED).update(
        status=Status.STOPPED, desired_state=DesiredState.STOPPED
    )


def write(index: int) -> list[list[Any]]:
    """Writer `index`'s calls, in order, with their outcomes."""
    from instances import services

    outcomes: list[list[Any]] = []

    def call(operation: str, name: str, action: Callable[..., Any], **fields: Any) -> None:
        began = time.perf_counter()
        outcome = _outcome(lambda: action(name, **fields))
        outcomes.append([operation, name, outcome, round(time.perf_counter() - began, 4)])

    def create(name: str, **fields: Any) -> Any:
        return services.create_instance(name=name, **fields)

    for round_ in range(ROUNDS):
        call("create", f"w{index}-{round_}", create, model_id="m")
        call("restart", SHARED, services.restart_instance)
    call("start", PARKED, services.start_instance)
    for round_ in range(1, ROUNDS, 2):
        call("stop", f"w{index}-{round_}", services.stop_instance)
    call("delete", f"w{index}-0", services.delete_instance)
    return outcomes


def _writer(index: int, together: threading.Barrier, outcomes: list[list[Any]]) -> None:
    from django.db import connection

    try:
        together.wait()
        outcomes.extend(write(index))
    finally:
        connection.close()  # this thread's own


def _outcome(action: Callable[[], Any]) -> str:
    from instances.errors import TeiManagerError

    try:
        action()
    except TeiManagerError as exc:
        return str(exc.code)
    except Exception as exc:
        return f"unexpected {type(exc).__name__}: {exc}"
    return "ok"


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
