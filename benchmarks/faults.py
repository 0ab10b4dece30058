"""Fault benchmark (`make bench`): writes benchmarks/results/faults.md.

Runs tests/fault_scenarios.py's scenarios, in turn, on one whole stack of real processes
(tests/stack.py: gunicorn, a Celery worker, beat, the multiplexer, a Redis of its own on
its own port, its own SQLite file, one localtei instance serving all-MiniLM-L6-v2), the
same ones tests/test_faults.py checks: SIGKILL an instance, a Celery pool process in the
middle of a launch, the Celery main process, beat, the multiplexer, Redis, gunicorn, then
8 concurrent SQLite writers. Each scenario checks what it promises (an AssertionError
stops the benchmark) and measures how long detection and recovery took.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

from tests import fault_scenarios  # noqa: E402
from tests.fault_scenarios import Recovery  # noqa: E402
from tests.stack import Stack  # noqa: E402


def main() -> None:
    load = os.getloadavg()[0]  # a shared machine: what else ran matters
    work = Path(tempfile.mkdtemp(prefix="teimanager-bench-faults-"))
    stack = Stack(work / "stack", f"bench-faults-{uuid.uuid4().hex[:8]}")
    try:
        stack.up()
        fault_scenarios.start_instance(stack)
        recoveries = []
        for scenario in fault_scenarios.SCENARIOS:
            recoveries.append(scenario(stack))
            print(fault_scenarios.table(recoveries[-1:]).splitlines()[-1], flush=True)
    except BaseException:
        print(stack.tails(), file=sys.stderr)
        raise
    finally:
        stack.down()
        shutil.rmtree(work, ignore_errors=True)
    report = render(recoveries, load)
    out = ROOT / "benchmarks" / "results" / "faults.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


def render(recoveries: list[Recovery], load: float) -> str:
    by_fault = {r.fault: r for r in recoveries}
    instance = by_fault["instance killed"].figures
    multiplexer = by_fault["multiplexer killed"].figures
    redis = by_fault["Redis killed"].figures
    writers = by_fault[f"{fault_scenarios.WRITERS} concurrent SQLite writers"].figures
    return "\n".join(
        [
            "# Fault benchmark",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs "
            f"(load average {load:.1f} at the start). "
            "One stack of real processes: gunicorn (2 workers), a prefork Celery worker "
            "(concurrency 2), beat ticking every second, the multiplexer, a Redis of its own, "
            "SQLite (WAL); one localtei instance serving all-MiniLM-L6-v2. Each fault is a "
            "SIGKILL; where a supervisor would restart the part (systemd's Restart=, "
            "compose's restart policy) the benchmark does, at once after the operator could "
            "see the fault.",
            "",
            fault_scenarios.table(recoveries),
            "",
            "- *time to detect*: from the fault to the first sign an operator gets: the "
            "instance row (instance, pool process), /health answering 503 (worker, beat, "
            "multiplexer, Redis; /health judges heartbeats: 3 intervals + 5 s, 8 s here for "
            "beat and the tick, 20 s for the worker and the multiplexer), the API refusing "
            "connections (gunicorn).",
            "- *time to recover*: from the fault (instance, pool process: the stack heals "
            "itself) or from the supervisor's restart (the other parts) until /health is 200 "
            "and the instance runs as its one tracked process and answers through the "
            "multiplexer. A recovery that relaunches the instance includes localtei loading "
            "its model. For the SQLite writers: how long their calls took together.",
            "- *localtei processes after*: live localtei processes of the stack once "
            "recovered (each scenario checks it is the one the row tracks, listening on its "
            "port, with its one log pipe and no orphan left).",
            "",
            f"Clients calling Embed every 0.2 s through the multiplexer saw the killed instance "
            f"as UNAVAILABLE for {instance['client_outage_secs']:.1f} s. The restarted "
            f"multiplexer listened {multiplexer['start_secs']:.1f} s after its start and "
            f"routed its first call {multiplexer['routes_after_listening_secs']:.2f} s after "
            f"that. With Redis down, a POST that enqueues answered in "
            f"{redis['enqueue_answer_secs']:.2f} s; once Redis was back the first tick ran "
            f"{redis['tick_after_broker_secs']:.1f} s later. The {int(writers['calls'])} "
            f"lifecycle calls of the SQLite writers took {writers['call_p50_secs'] * 1000:.0f} ms "
            f"(median) and {writers['call_max_secs'] * 1000:.0f} ms at most each, none "
            "refused for a locked database.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
