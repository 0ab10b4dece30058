"""One of the concurrent SQLite writers of the fault suite (tests/fault_scenarios.py): the
lifecycle service, called from a process of its own with its own connection, on a node no
worker serves (so nothing but the writers changes the rows).

    python -m tests.fault_writer setup           # the two rows every writer contends for
    python -m tests.fault_writer write INDEX     # prints "ready", waits for a line, writes

`write` prints one JSON line: {"index", "outcomes": [[operation, name, outcome], ...]},
an outcome being "ok", an error code the API would answer (INSTANCE_EXISTS, ...), or
"unexpected <type>: <message>" for anything else ("database is locked" would be one).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

ROUNDS = 4  # creates per writer; every other one is stopped, the first deleted
SHARED, PARKED = "shared", "parked"  # restarted by every writer / started by every writer
DEAD_PID = 2**22 + 7  # above Linux's pid_max: no live process has it


def main(argv: list[str]) -> int:
    import django

    django.setup()
    if argv == ["setup"]:
        setup()
        return 0
    if len(argv) == 2 and argv[0] == "write":
        print("ready", flush=True)
        sys.stdin.readline()
        outcomes = write(int(argv[1]))
        print(json.dumps({"index": int(argv[1]), "outcomes": outcomes}), flush=True)
        return 0
    sys.stderr.write(__doc__ or "")
    return 2


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


def write(index: int) -> list[list[str]]:
    from instances import services

    outcomes: list[list[str]] = []

    def call(operation: str, name: str, action: Callable[..., Any], **fields: Any) -> None:
        outcomes.append([operation, name, _outcome(lambda: action(name, **fields))])

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
