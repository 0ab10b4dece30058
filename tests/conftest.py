"""Shared fixtures for the whole suite.

Isolation (set up when this file is imported, before any test runs):
- the test database is a *file* (`SESSION_DIR/test.sqlite3`), so a Celery worker
  subprocess, a gunicorn or the multiplexer can open it; tests whose rows other processes
  must see need `@pytest.mark.django_db(transaction=True)`; with a PostgreSQL
  DATABASE_URL it is the database `test_teimanager_<session>` on that server, and
  TEST_ENV's DATABASE_URL names it for those processes;
- Celery talks to Redis DB `TEST_REDIS_DB` (15) with queue names unique to this session
  (`TEST_DEFAULT_QUEUE`, node `TEST_NODE`), so it never meets a running `make run` or
  another test session;
- instance ports come from a range picked for this session; logs go to `TEST_LOG_DIR`;
- settings.TEI is the test config (`TEST_CONFIG_FILE`): health checks every second.

Fixtures:
- `manager_worker`: a real Celery worker (prefork, with an embedded beat that runs the
  reconcile tick every second) serving node `TEST_NODE`, started once per session; at the
  end of each test that used it, every instance's process is killed and its row removed.
- `fake_worker`: the same for node `FAKE_NODE`, whose TEI_BINARY_PATH is `FAKE_TEI` (see
  tests/fake_tei.py: `crash/...` model ids exit 1, `hang/...` never get healthy, others
  serve grpc.health only); it sets settings.NODE_NAME so that creates land on it.
- `start_worker(node, **env)`: start an extra worker on another node (crash tests,
  adoption); it is stopped at the end of the test. `Worker.kill()` simulates a crash.
- `running_instance(name, **fields)`: create through the lifecycle service and wait until
  `running`; `wait_for_status(name, *statuses)`; `wait_until(predicate)`.
- `log_dir`: the log directory the workers write to (TEST_LOG_DIR).
- `api`: a DRF APIClient.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dj_database_url
import pytest
from django.conf import settings

from teimanager.celery import app as celery_app
from teimanager.config import load_config
from tests.stack import CeleryWorker, wait_until

ROOT = Path(__file__).resolve().parent.parent
SESSION_ID = uuid.uuid4().hex[:8]
SESSION_DIR = Path(tempfile.mkdtemp(prefix=f"teimanager-tests-{SESSION_ID}-"))
TEST_DB = SESSION_DIR / "test.sqlite3"
TEST_LOG_DIR = SESSION_DIR / "logs"
TEST_REDIS_DB = 15
TEST_BROKER_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
TEST_NODE = f"test-{SESSION_ID}"
TEST_DEFAULT_QUEUE = f"tests-{SESSION_ID}"
_PORT_BASE = random.Random(SESSION_ID).randrange(20000, 40000, 400)
FAKE_NODE = f"fake-{SESSION_ID}"
FAKE_TEI = SESSION_DIR / "fake-tei"
FAKE_TEI.write_text(
    f"#!{sys.executable}\n"
    f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
    "import fake_tei\nfake_tei.main(sys.argv[1:])\n"
)
FAKE_TEI.chmod(0o755)
TEST_CONFIG_FILE = SESSION_DIR / "tei-manager.toml"
TEST_CONFIG_FILE.write_text(
    f"""
health_check_interval_secs = 1
startup_timeout_secs = 120
max_failures_before_restart = 3
graceful_shutdown_timeout_secs = 5
auto_restore_on_restart = true
max_instances = 100
instance_port_start = {_PORT_BASE}
instance_port_end = {_PORT_BASE + 199}
prometheus_port_start = {_PORT_BASE + 200}
prometheus_port_end = {_PORT_BASE + 399}
# Creates stay on the creating process's node (settings.NODE_NAME, which tests set): the
# session's workers register several nodes in one database. tests/test_node_placement.py and
# tests/test_two_nodes.py place with "spread".
placement = "local"
"""
)
TEST_ENV = {
    "DJANGO_SETTINGS_MODULE": "teimanager.settings",
    "TEI_MANAGER_CONFIG": str(TEST_CONFIG_FILE),
    "TEI_MANAGER_STATE_FILE": str(TEST_DB),
    "TEI_MANAGER_LOG_DIR": str(TEST_LOG_DIR),
    "TEI_MANAGER_NODE": TEST_NODE,
    "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "1",
    "TEI_BINARY_PATH": "",
    "CELERY_BROKER_URL": TEST_BROKER_URL,
    "CELERY_TASK_DEFAULT_QUEUE": TEST_DEFAULT_QUEUE,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    # One intra-op thread per instance: steadier than one per core on a loaded 2-core runner.
    "LOCALTEI_NUM_THREADS": "1",
    # A `runmultiplexer` under test serves HTTP only where it asks for a free --http-port.
    "TEI_MANAGER_HTTP_ENABLED": "false",
    # Every localtei of the session shares one ONNX cache: each model is exported once.
    "LOCALTEI_CACHE": str(SESSION_DIR / "localtei-cache"),
    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "proto")]),
}


def _test_database_url() -> str:
    """With DATABASE_URL (PostgreSQL: `make test`'s second pass), the URL of this session's
    own test database (pytest-django creates it, named below), which every worker, web and
    multiplexer the tests start must open; "" on SQLite."""
    url = os.environ.get("DATABASE_URL", "")
    if not url or dj_database_url.parse(url)["ENGINE"].endswith("sqlite3"):
        return ""
    return url.rsplit("/", 1)[0] + "/" + POSTGRES_TEST_DB


POSTGRES_TEST_DB = f"test_teimanager_{SESSION_ID}"
TEST_DATABASE_URL = _test_database_url()
if TEST_DATABASE_URL:
    TEST_ENV["DATABASE_URL"] = TEST_DATABASE_URL


def _isolate() -> None:
    # Celery takes CELERY_BROKER_URL from the environment before its own configuration, and
    # `make test` exports the production default: every publish of this process would go
    # to Redis DB 0 instead of the test's DB, where no test worker listens.
    for key in (
        "TEI_MANAGER_STATE_FILE",
        "TEI_MANAGER_LOG_DIR",
        "TEI_MANAGER_CONFIG",
        "LOCALTEI_CACHE",
        "CELERY_BROKER_URL",
        "CELERY_TASK_DEFAULT_QUEUE",
        *(["DATABASE_URL"] if TEST_DATABASE_URL else []),
    ):
        os.environ[key] = TEST_ENV[key]
    os.environ.pop("TEI_BINARY_PATH", None)
    settings.TEI = load_config(env=TEST_ENV)
    settings.LOG_DIR = TEST_LOG_DIR
    settings.NODE_NAME = TEST_NODE
    settings.CELERY_BROKER_URL = TEST_BROKER_URL
    settings.CELERY_TASK_DEFAULT_QUEUE = TEST_DEFAULT_QUEUE
    celery_app.conf.broker_url = TEST_BROKER_URL
    celery_app.conf.task_default_queue = TEST_DEFAULT_QUEUE
    TEST_LOG_DIR.mkdir(parents=True, exist_ok=True)


_isolate()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _drop_test_queues()
    shutil.rmtree(SESSION_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    test = settings.DATABASES["default"].setdefault("TEST", {})
    test["NAME"] = POSTGRES_TEST_DB if TEST_DATABASE_URL else str(TEST_DB)


@pytest.fixture
def log_dir() -> Path:
    return TEST_LOG_DIR


@pytest.fixture
def api() -> Any:
    from rest_framework.test import APIClient

    return APIClient()


class Worker(CeleryWorker):
    """A `celery worker -B` subprocess serving one node of this test session."""

    def __init__(self, node: str, env: dict[str, str], name: str) -> None:
        full_env = {**os.environ, **TEST_ENV, "TEI_MANAGER_NODE": node, **env}
        if not TEST_DATABASE_URL:
            full_env.pop("DATABASE_URL", None)
        log_file = SESSION_DIR / f"worker-{name}.log"
        super().__init__(node, full_env, log_file, schedule=SESSION_DIR / f"beat-{name}")


@pytest.fixture(scope="session")
def _session_worker(django_db_setup: None, django_db_blocker: Any) -> Iterator[Worker]:
    from tests.localtei_fixtures import MINILM_ID, prepare_onnx

    prepare_onnx(MINILM_ID)  # exported once, before any instance's start-up timeout runs
    worker = Worker(TEST_NODE, {}, "session").start()
    yield worker
    with django_db_blocker.unblock():
        kill_all_instances()
    worker.stop()


@pytest.fixture
def manager_worker(_session_worker: Worker, transactional_db: None) -> Iterator[Worker]:
    yield _session_worker
    kill_all_instances()


@pytest.fixture(scope="session")
def _fake_session_worker(django_db_setup: None, django_db_blocker: Any) -> Iterator[Worker]:
    worker = Worker(FAKE_NODE, {"TEI_BINARY_PATH": str(FAKE_TEI)}, "fake").start()
    yield worker
    with django_db_blocker.unblock():
        kill_all_instances()
    worker.stop()


@pytest.fixture
def fake_worker(
    _fake_session_worker: Worker, transactional_db: None, settings: Any
) -> Iterator[Worker]:
    settings.NODE_NAME = FAKE_NODE
    yield _fake_session_worker
    kill_all_instances()


@pytest.fixture
def start_worker(transactional_db: None) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(node: str, **env: str) -> Worker:
        worker = Worker(node, env, f"{node}-{len(started)}").start()
        started.append(worker)
        return worker

    yield start
    kill_all_instances()
    for worker in started:
        worker.stop()


def kill_all_instances() -> None:
    """SIGKILL every instance process the database knows, then remove the rows."""
    from instances import process
    from instances.models import Instance

    for pid, started in Instance.objects.exclude(pid=None).values_list("pid", "process_started_at"):
        if process.is_alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    Instance.objects.all().delete()


def wait_for_status(name: str, *statuses: str, timeout: float = 90) -> Any:
    """Wait until instance `name` is in one of `statuses`; returns the Instance."""
    from instances.models import Instance

    def current() -> Any:
        instance = Instance.objects.filter(name=name).first()
        return instance if instance is not None and instance.status in statuses else None

    try:
        return wait_until(current, timeout, f"{name} to be {'/'.join(statuses)}")
    except AssertionError:
        instance = Instance.objects.filter(name=name).first()
        state = "gone" if instance is None else f"{instance.status}: {instance.last_error}"
        raise AssertionError(
            f"{name} not {'/'.join(statuses)} after {timeout}s ({state})"
        ) from None


def wait_for_new_process(name: str, old_pid: int, timeout: float, message: str) -> Any:
    """Wait until instance `name` is running again under a pid other than `old_pid`."""
    from instances.models import Instance, Status

    return wait_until(
        lambda: (
            Instance.objects.filter(name=name, status=Status.RUNNING).exclude(pid=old_pid).first()
        ),
        timeout,
        message,
    )


@pytest.fixture
def running_instance(manager_worker: Worker) -> Callable[..., Any]:
    from instances import services
    from instances.models import Status

    def create(name: str, model_id: str = "sentence-transformers/all-MiniLM-L6-v2", **fields: Any):
        services.create_instance(name=name, model_id=model_id, **fields)
        return wait_for_status(name, Status.RUNNING, Status.FAILED)

    return create


def _drop_test_queues() -> None:
    try:
        import redis

        client = redis.Redis.from_url(TEST_BROKER_URL, socket_connect_timeout=1)
        keys = [k for k in client.scan_iter(f"*{SESSION_ID}*")]
        if keys:
            client.delete(*keys)
    except Exception:
        pass
