"""Fault scenarios on a running `Stack` (tests/stack.py), shared by tests/test_faults.py
and benchmarks/faults.py (no pytest here).

Each scenario breaks one part the way a crash does (SIGKILL), plays the supervisor where
one would restart that part (systemd's Restart=, compose's restart policy), and checks
what the operator sees (/health over gunicorn, the instance row), that nothing is lost
(the desired state, exactly one localtei process, the tracked one, serving the port, no
orphan) and how long detection and recovery took. It returns a `Recovery`; a broken
promise is an AssertionError.

The clocks: `detect_secs` runs from the fault to the first sign an operator gets (the
row or /health); `recover_secs` from the fault, or from the supervisor's restart for a
killed service, until the stack is whole again (/health 200, the instance running as its
one tracked process and answering through the multiplexer).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from tests import fault_writer
from tests.stack import LOGPIPE, MINILM, ROOT, Stack, children, cmdline, wait_until

INSTANCE = "victim"  # the localtei instance every scenario keeps serving
RECOVERY_SECS = 180.0  # generous: a model load on a busy two-core machine
WRITERS = 8


@dataclass(frozen=True)
class Recovery:
    fault: str
    seen: str  # what the operator saw, in words
    detect_secs: float | None
    recover_secs: float
    processes_after: int  # localtei processes of the stack once recovered
    figures: dict[str, float] = field(default_factory=dict)  # more measurements


def start_instance(stack: Stack) -> dict[str, Any]:
    status, body = stack.api("POST", "/instances", {"name": INSTANCE, "model_id": MINILM})
    assert status == 201, body
    return whole(stack)


def whole(stack: Stack, timeout: float = RECOVERY_SECS) -> dict[str, Any]:
    """Wait until the stack is whole: /health 200, the instance running as its one tracked
    process and answering through the multiplexer; its row."""
    row = wait_until(lambda: stack.settled(INSTANCE), timeout, "the instance settled")
    wait_until(lambda: _answers(stack), timeout, "an answer through the multiplexer")
    wait_until(stack.healthy, timeout, "/health 200")
    assert row["desired_state"] == "running"
    return row


# The instance and the worker's pool ---------------------------------------------------


def kill_instance(stack: Stack) -> Recovery:
    """SIGKILL the instance: the next tick sees it dead and launches it again."""
    before = whole(stack)
    with Client(stack) as client:
        killed = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        seen = wait_until(lambda: _left_running(stack, before), 60, "the row to see the death")
        detect = time.monotonic() - killed
        health = stack.health()
        after = whole(stack)
        recover = time.monotonic() - killed
    assert f"process {before['pid']} exited" in seen["last_error"], seen
    assert health[0] == 200, f"an instance crash is not the stack's: {health}"
    assert after["pid"] != before["pid"] and after["restarts"] == before["restarts"] + 1
    return Recovery(
        "instance killed",
        f"row {seen['status']}, last_error 'process {before['pid']} exited', restarts +1; "
        f"/health 200 throughout; clients UNAVAILABLE for {client.outage():.1f} s",
        detect,
        recover,
        len(stack.census().pids),
        {"client_outage_secs": client.outage()},
    )


def kill_pool_process_mid_launch(stack: Stack, attempts: int = 5) -> Recovery:
    """SIGKILL the pool process that runs a launch, after its claim and spawn, before it
    saved the pid: the next tick stops the process it left and launches again."""
    for _ in range(attempts):
        before = whole(stack)
        killed_at, stray = _kill_the_launching_pool_process(stack)
        if killed_at is not None:
            break
    else:
        raise AssertionError(f"no launch was caught before its pid save in {attempts} tries")
    seen = wait_until(
        lambda: (row := stack.row(INSTANCE)) and "launch lost" in row["last_error"] and row,
        60,
        "the lost launch to be seen",
    )
    detect = time.monotonic() - killed_at
    health = stack.health()
    after = whole(stack)
    recover = time.monotonic() - killed_at
    assert health[0] == 200, f"a lost launch is the instance's, not the stack's: {health}"
    assert f"stopping the process it left ({stray})" in seen["last_error"], seen
    assert stray is not None and stray not in stack.census().pids, "the stray lives on"
    assert after["pid"] != stray and after["pid"] != before["pid"]
    # The restart asked for counts, and so does the launch the tick made again.
    assert after["restarts"] == before["restarts"] + 2, (before, after)
    return Recovery(
        "Celery pool process killed mid-launch",
        f"row {seen['status']}, last_error 'launch lost … stopping the process it left', "
        "restarts +1; /health 200",
        detect,
        recover,
        len(stack.census().pids),
    )


def _kill_the_launching_pool_process(stack: Stack) -> tuple[float | None, int | None]:
    """Restart the instance and SIGKILL the pool process whose launch has claimed the row
    and spawned its log pipe, before the pid is saved. (kill time, the spawned instance's
    pid), or (None, None) when the pid was saved first."""
    pools = stack.worker.pool_processes()
    status, body = stack.api("POST", f"/instances/{INSTANCE}/restart")
    assert status == 200, body
    sql = "SELECT status, pid FROM instances_instance WHERE name = ?"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state, pid = stack.query(sql, INSTANCE)[0]
        if state == "starting" and pid is not None:
            return None, None  # too late
        if state == "starting":
            for pool in pools:
                pipe = next((c for c in children(pool) if LOGPIPE in cmdline(c)), None)
                if pipe is not None:
                    os.kill(pool, signal.SIGKILL)
                    killed_at = time.monotonic()
                    if stack.query(sql, INSTANCE)[0][1] is not None:
                        return None, None  # saved just before the kill
                    instance = wait_until(lambda p=pipe: children(p), 10, "the spawned instance")
                    return killed_at, instance[0]
        time.sleep(0.002)
    raise AssertionError("the launch never claimed the row")


# The Celery main process, beat --------------------------------------------------------


def kill_worker(stack: Stack) -> Recovery:
    """SIGKILL the worker's main process (systemd's KillMode=process leaves the rest): the
    instances keep serving; the restarted worker adopts them."""
    before = whole(stack)
    pools = stack.worker.pool_processes()
    killed = time.monotonic()
    stack.worker.kill_main()
    code, body = wait_until(lambda: _unhealthy(stack, "reconcile"), 60, "/health 503")
    detect = time.monotonic() - killed
    assert stack.census().localtei == {before["port"]: {before["pid"]}}
    assert _answers(stack), "the instance stopped answering with its worker gone"
    wait_until(lambda: not any(_live(p) for p in pools), 30, "the pool processes to exit")
    restarted = time.monotonic()
    stack.worker.start()
    adopted = wait_until(
        lambda: _checked_since(stack, restarted), RECOVERY_SECS, "a health check by the new worker"
    )
    after = whole(stack)
    recover = time.monotonic() - restarted
    assert (adopted["pid"], after["pid"], after["restarts"]) == (
        before["pid"], before["pid"], before["restarts"]
    )  # fmt: skip
    return Recovery(
        "Celery main process killed",
        f"/health {code} stale {body['stale']}; instance kept serving (same pid), "
        "adopted by the restarted worker",
        detect,
        recover,
        len(stack.census().pids),
        {"down_secs": restarted - killed},
    )


def kill_beat(stack: Stack) -> Recovery:
    before = whole(stack)
    killed = time.monotonic()
    stack.beat.kill_main()
    code, body = wait_until(lambda: _unhealthy(stack, "beat"), 60, "/health 503")
    detect = time.monotonic() - killed
    assert _answers(stack) and stack.census().localtei == {before["port"]: {before["pid"]}}
    restarted = time.monotonic()
    stack.beat.start()
    after = whole(stack)
    recover = time.monotonic() - restarted
    assert after["pid"] == before["pid"]
    return Recovery(
        "beat killed",
        f"/health {code} stale {body['stale']}; instance kept serving",
        detect,
        recover,
        len(stack.census().pids),
    )


# The multiplexer, web -----------------------------------------------------------------


def kill_multiplexer(stack: Stack) -> Recovery:
    """Clients get UNAVAILABLE at once; /health names the multiplexer once its heartbeat is
    stale; the restarted multiplexer routes as soon as it listens."""
    before = whole(stack)
    killed = time.monotonic()
    stack.multiplexer.kill_main()
    refused = _call_code(stack)
    assert refused == grpc.StatusCode.UNAVAILABLE, refused
    code, body = wait_until(lambda: _unhealthy(stack, "multiplexer"), 60, "/health 503")
    detect = time.monotonic() - killed
    restarted = time.monotonic()
    stack.multiplexer.start()
    listening = time.monotonic()
    wait_until(lambda: _answers(stack), 30, "an answer through the restarted multiplexer")
    routed = time.monotonic() - listening
    after = whole(stack)
    recover = time.monotonic() - restarted
    assert after["pid"] == before["pid"]
    return Recovery(
        "multiplexer killed",
        f"clients {refused.name} at once; /health {code} stale {body['stale']}",
        detect,
        recover,
        len(stack.census().pids),
        {"start_secs": listening - restarted, "routes_after_listening_secs": routed},
    )


def kill_web(stack: Stack) -> Recovery:
    """SIGKILL gunicorn's master: its workers notice and exit, the API refuses
    connections; the restarted gunicorn serves the same state."""
    whole(stack)
    state = _state(stack)
    killed = time.monotonic()
    stack.web.kill_main()
    wait_until(lambda: stack.health()[0] is None, 30, "the API to refuse connections")
    detect = time.monotonic() - killed
    assert _answers(stack), "the data plane went down with web"
    restarted = time.monotonic()
    stack.web.start()
    whole(stack)
    recover = time.monotonic() - restarted
    assert _state(stack) == state
    return Recovery(
        "gunicorn killed",
        f"API connections refused {detect:.1f} s after (once its workers saw their master "
        "gone); data plane kept serving; the restarted gunicorn serves the same instances",
        detect,
        recover,
        len(stack.census().pids),
    )


# Redis, SQLite ------------------------------------------------------------------------


def stop_redis(stack: Stack) -> Recovery:
    """SIGKILL the broker: API requests that enqueue still answer; what they asked for is
    done once it is back, by the reconcile tick (the messages died with it)."""
    before = whole(stack)
    killed = time.monotonic()
    stack.redis.kill_main()
    asked = time.monotonic()
    code, body = stack.api("POST", f"/instances/{INSTANCE}/restart", timeout=60)
    answer_secs = time.monotonic() - asked
    assert code == 200 and body["status"] == "pending", (code, body)
    assert stack.api("GET", "/instances")[0] == 200
    health, verdict = wait_until(lambda: _unhealthy(stack, "reconcile"), 60, "/health 503")
    detect = time.monotonic() - killed
    # Nothing is lost meanwhile: the restart waits, the old process still serves its port.
    row = stack.row(INSTANCE)
    assert (row["status"], row["desired_state"]) == ("pending", "running"), row
    assert stack.census().localtei == {before["port"]: {before["pid"]}}
    restarted = time.monotonic()
    back = time.time()
    stack.redis.start()
    # Celery's worker can end on an "Unrecoverable error" when its broker connection
    # breaks or comes back (celery/kombu): its instances serve on (checked above for a
    # break), and its supervisor starts it again.
    revived: list[str] = []

    def ticked() -> bool:
        revived.extend(supervise(stack))
        return _beat_since(stack, "reconcile", back)

    wait_until(ticked, 120, "a tick once Redis is back")
    ticking = time.monotonic() - restarted

    def restarted_as_asked() -> dict[str, Any] | None:
        revived.extend(supervise(stack))
        row = stack.settled(INSTANCE)
        return row if row is not None and row["pid"] != before["pid"] else None

    after = wait_until(
        restarted_as_asked, RECOVERY_SECS, "the restart asked for while the broker was down"
    )
    whole(stack)
    recover = time.monotonic() - restarted
    assert after["restarts"] == before["restarts"] + 1
    exited = f"; {', '.join(revived)} exited with it and was restarted" if revived else ""
    return Recovery(
        "Redis killed",
        f"POST restart answered {code} in {answer_secs:.2f} s; /health {health} stale "
        f"{verdict['stale']}; the restart ran once Redis was back{exited}",
        detect,
        recover,
        len(stack.census().pids),
        {"enqueue_answer_secs": answer_secs, "tick_after_broker_secs": ticking},
    )


def sqlite_writers(stack: Stack, writers: int = WRITERS) -> Recovery:
    """`writers` threads, each with its own connection, call the lifecycle service at once
    (creates, restarts, starts, stops, deletes) on the stack's database, while the stack
    writes its own heartbeats and ticks: every call gets its documented outcome, and the
    rows say exactly what the calls imply."""
    whole(stack)
    node = f"{stack.node}-writers"
    # Creates stay on the writers' own node, which no worker serves: nothing launches.
    env = {**stack.env, "TEI_MANAGER_NODE": node, "TEI_MANAGER_PLACEMENT": "local"}
    created = _counter(stack, "instances_created")
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.fault_writer", str(writers)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
    )
    try:
        assert writer.stdout is not None
        answer = json.loads(writer.stdout.readline() or "null")
        assert answer is not None, f"the writers exited {writer.wait(10)}"
        created += 2  # the two rows they contend for
        outcomes = [tuple(o[:3]) for calls in answer["writers"] for o in calls]
        seconds = sorted(o[3] for calls in answer["writers"] for o in calls)
        rows = {
            name: (status, desired, restarts)
            for name, status, desired, restarts in stack.query(
                "SELECT name, status, desired_state, restarts FROM instances_instance "
                "WHERE node = ?",
                node,
            )
        }
        ports = stack.query(
            "SELECT port, prometheus_port FROM instances_instance WHERE node = ?", node
        )
        created_now = _counter(stack, "instances_created") - created
    finally:
        writer.kill()  # done: its answer is in
        writer.wait(10)
        stack.query("DELETE FROM instances_instance WHERE node = ?", node)
        stack.query("DELETE FROM instances_orphanprocess WHERE node = ?", node)
    unexpected = [o for o in outcomes if o[2] not in ("ok", "ALREADY_RUNNING")]
    assert not unexpected, unexpected
    starts = sorted(o[2] for o in outcomes if o[0] == "start")
    assert starts == ["ALREADY_RUNNING"] * (writers - 1) + ["ok"], starts
    expected = {
        fault_writer.SHARED: ("pending", "running", 1),
        fault_writer.PARKED: ("pending", "running", 0),
    }
    for i in range(writers):
        for round_ in range(1, fault_writer.ROUNDS):
            stopped = round_ % 2 == 1
            expected[f"w{i}-{round_}"] = (
                ("stopping", "stopped", 0) if stopped else ("pending", "running", 0)
            )
    assert rows == expected, {k: (rows.get(k), v) for k, v in expected.items() if rows.get(k) != v}
    every_port = [port for pair in ports for port in pair]
    assert len(every_port) == len(set(every_port)), "two instances got one port"
    assert created_now == writers * fault_writer.ROUNDS
    whole(stack)
    return Recovery(
        f"{writers} concurrent SQLite writers",
        f"{len(outcomes)} lifecycle calls: no 'database is locked', {len(starts) - 1} "
        "ALREADY_RUNNING and one start for the raced start, rows exactly as the calls imply",
        None,
        answer["seconds"],
        len(stack.census().pids),
        {
            "calls": float(len(outcomes)),
            "call_p50_secs": seconds[len(seconds) // 2],
            "call_max_secs": seconds[-1],
        },
    )


SCENARIOS: list[Callable[[Stack], Recovery]] = [
    kill_instance,
    kill_pool_process_mid_launch,
    kill_worker,
    kill_beat,
    kill_multiplexer,
    stop_redis,
    kill_web,
    sqlite_writers,
]


def supervise(stack: Stack) -> list[str]:
    """What systemd's Restart=on-failure does: start again every part that exited with a
    failure; the names of those parts."""
    revived = []
    for service in (stack.worker, stack.beat, stack.web, stack.multiplexer):
        if service.process is not None and service.process.poll() is not None:
            status = service.process.returncode
            assert status != 0, f"{service.name} exited 0: a supervisor would leave it down"
            revived.append(f"{service.name} (exit status {status})")
            service.start()
    return revived


def table(recoveries: list[Recovery]) -> str:
    """The recoveries as a Markdown table."""
    lines = [
        "| fault | what the operator saw | time to detect | time to recover | "
        "localtei processes after |",
        "|---|---|---|---|---|",
    ]
    for r in recoveries:
        detect = "–" if r.detect_secs is None else f"{r.detect_secs:.1f} s"
        lines.append(
            f"| {r.fault} | {r.seen} | {detect} | {r.recover_secs:.1f} s | {r.processes_after} |"
        )
    return "\n".join(lines)


class Client:
    """A client of the multiplexer: Embed every `every` seconds over one channel, in a
    thread; remembers when calls failed."""

    def __init__(self, stack: Stack, every: float = 0.2) -> None:
        self.stack, self.every = stack, every
        self.calls: list[tuple[float, bool]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Client:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def outage(self) -> float:
        """From the first failed call to the first success after it (0: none failed)."""
        failed = [at for at, ok in self.calls if not ok]
        if not failed:
            return 0.0
        back = [at for at, ok in self.calls if ok and at > failed[0]]
        return (back[0] if back else self.calls[-1][0]) - failed[0]

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.calls.append((time.monotonic(), _answers(self.stack, timeout=2)))


def _answers(stack: Stack, timeout: float = 5) -> bool:
    return _call_code(stack, timeout) == grpc.StatusCode.OK


def _call_code(stack: Stack, timeout: float = 5) -> grpc.StatusCode:
    try:
        stack.embed(INSTANCE, timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _left_running(stack: Stack, before: dict[str, Any]) -> dict[str, Any] | None:
    row = stack.row(INSTANCE)
    return row if (row["status"], row["pid"]) != ("running", before["pid"]) else None


def _unhealthy(stack: Stack, part: str) -> tuple[int, Any] | None:
    """/health's answer once it is 503 naming `part` stale."""
    code, body = stack.health()
    assert code in (200, 503), f"/health answered {code}: {body}"
    return (code, body) if code == 503 and part in body["stale"] else None


def _beat_since(stack: Stack, name: str, moment: float) -> bool:
    """Heartbeat `name` was written after `moment` (a wall-clock time)."""
    seen = stack.health()[1]["heartbeats"].get(name)
    return bool(seen) and _timestamp(seen) > moment


def _checked_since(stack: Stack, moment: float) -> dict[str, Any] | None:
    """The row once it was health-checked after `moment` (monotonic)."""
    row = stack.row(INSTANCE)
    checked = row["last_health_check"]
    since = time.time() - (time.monotonic() - moment)
    if checked and _timestamp(checked) > since:
        return row
    return None


def _timestamp(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _state(stack: Stack) -> list[tuple[Any, ...]]:
    """What GET /instances says of each instance, less the clocks that move on their own."""
    status, rows = stack.api("GET", "/instances")
    assert status == 200, rows
    keys = ("name", "status", "desired_state", "pid", "port", "restarts", "last_error")
    return [tuple(row[key] for key in keys) for row in rows]


def _counter(stack: Stack, name: str) -> int:
    rows = stack.query("SELECT value FROM instances_counter WHERE name = ?", name)
    return int(rows[0][0]) if rows else 0


def _live(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
