"""Faults, in turn, on one whole stack of real processes (tests/stack.py): web (gunicorn),
worker, beat, multiplexer, its own Redis on its own port, its own SQLite file, and one
localtei instance. The scenarios are in tests/fault_scenarios.py (benchmarks/faults.py
runs the same ones): each kills a part with SIGKILL, restarts it where a supervisor
would, and checks what the operator sees (/health, the instance row), that nothing is
lost (desired state, exactly the tracked localtei process on its port, no orphan) and
that recovery takes a bounded time. The bounds are generous (a shared two-core machine);
the figures of the last run go to pytest's cache (.pytest_cache/d/faults/recoveries.md)
and to each test's properties (`--junitxml`).

The tests share the stack and run in file order; each starts from a whole stack and
leaves one behind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import SESSION_DIR, SESSION_ID
from tests.stack import Stack

pytest.register_assert_rewrite("tests.fault_scenarios")

from tests import fault_scenarios as faults  # noqa: E402
from tests.fault_scenarios import Recovery  # noqa: E402


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    stack = Stack(SESSION_DIR / "faults", f"faults-{SESSION_ID}")
    try:
        stack.up()
        faults.start_instance(stack)
        yield stack
    except BaseException:
        print(stack.tails())
        raise
    finally:
        stack.down()


@pytest.fixture(scope="module")
def recoveries(request: pytest.FixtureRequest) -> Iterator[list[Recovery]]:
    found: list[Recovery] = []
    yield found
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    if found and cache is not None:
        path = cache.mkdir("faults") / "recoveries.md"
        path.write_text(faults.table(found) + "\n")


@pytest.fixture
def run(
    stack: Stack, recoveries: list[Recovery], record_property: Callable[[str, object], None]
) -> Callable[[Callable[[Stack], Recovery]], Recovery]:
    def run(scenario: Callable[[Stack], Recovery]) -> Recovery:
        try:
            recovery = scenario(stack)
        except BaseException:
            print(stack.tails())  # shown with the failure
            raise
        recoveries.append(recovery)
        for name, value in [
            ("detect_secs", recovery.detect_secs),
            ("recover_secs", recovery.recover_secs),
            *recovery.figures.items(),
        ]:
            record_property(name, value)
        assert recovery.processes_after == 1
        return recovery

    return run


def test_a_killed_instance_is_launched_again_by_the_next_tick(run: Any) -> None:
    recovery = run(faults.kill_instance)
    assert recovery.detect_secs < 30
    assert recovery.recover_secs < faults.RECOVERY_SECS


def test_a_pool_process_killed_mid_launch_is_relaunched_once(run: Any) -> None:
    recovery = run(faults.kill_pool_process_mid_launch)
    assert recovery.detect_secs < 60  # lost after 5 s, seen by the tick after that
    assert recovery.recover_secs < faults.RECOVERY_SECS


def test_a_killed_worker_leaves_instances_serving_and_the_next_adopts_them(run: Any) -> None:
    recovery = run(faults.kill_worker)
    assert recovery.detect_secs < 60  # reconcile: stale after 3 ticks + 5 s
    assert recovery.recover_secs < 120


def test_a_killed_beat_turns_health_503_until_it_is_back(run: Any) -> None:
    recovery = run(faults.kill_beat)
    assert recovery.detect_secs < 60
    assert recovery.recover_secs < 120


def test_a_killed_multiplexer_is_unavailable_then_routes_as_soon_as_it_listens(
    run: Any,
) -> None:
    recovery = run(faults.kill_multiplexer)
    assert recovery.detect_secs < 60  # its heartbeat: stale after 20 s
    assert recovery.figures["routes_after_listening_secs"] < 5
    assert recovery.recover_secs < 120


def test_requests_answer_while_redis_is_down_and_their_work_is_done_after(run: Any) -> None:
    recovery = run(faults.stop_redis)
    assert recovery.figures["enqueue_answer_secs"] < 15
    assert recovery.detect_secs < 60
    assert recovery.recover_secs < faults.RECOVERY_SECS


def test_a_killed_gunicorn_comes_back_serving_the_same_state(run: Any) -> None:
    recovery = run(faults.kill_web)
    assert recovery.detect_secs < 30
    assert recovery.recover_secs < 120


def test_eight_concurrent_sqlite_writers_get_exactly_their_outcomes(run: Any) -> None:
    recovery = run(faults.sqlite_writers)
    assert recovery.recover_secs < 120
