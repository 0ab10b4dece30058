"""The migrations, on the engine this run uses (SQLite, or PostgreSQL in `make test`'s
PostgreSQL pass): every one applies to an empty database, every one unapplies, and the
models need no migration that is not written."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, SESSION_DIR, TEST_DATABASE_URL, TEST_ENV

pytestmark = pytest.mark.postgres


@pytest.fixture
def empty_database() -> Iterator[dict[str, str]]:
    """The environment of a process that opens a new, empty database."""
    env = {**os.environ, **TEST_ENV}
    if not TEST_DATABASE_URL:
        env["TEI_MANAGER_STATE_FILE"] = str(SESSION_DIR / f"migrations-{uuid.uuid4().hex}.sqlite3")
        env.pop("DATABASE_URL", None)
        yield env
        return
    import psycopg

    name = f"test_teimanager_migrations_{uuid.uuid4().hex[:8]}"
    server = TEST_DATABASE_URL.rsplit("/", 1)[0]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env["DATABASE_URL"] = f"{server}/{name}"
    try:
        yield env
    finally:
        with (
            psycopg.connect(f"{server}/postgres", autocommit=True) as admin,
            contextlib.suppress(psycopg.Error),
        ):
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_the_migrations_apply_from_zero_and_back_and_cover_the_models(
    empty_database: dict[str, str],
) -> None:
    engine = "postgresql" if TEST_DATABASE_URL else "sqlite"
    applied = manage(empty_database, "migrate", "--noinput")
    assert applied.returncode == 0, applied.stderr
    shown = manage(empty_database, "showmigrations", "--plan")
    assert "[ ]" not in shown.stdout and "[X]  nodes.0001_initial" in shown.stdout, engine
    backwards = manage(empty_database, "migrate", "nodes", "zero", "--noinput")
    assert backwards.returncode == 0, backwards.stderr
    again = manage(empty_database, "migrate", "--noinput")
    assert again.returncode == 0, again.stderr
    check = manage(empty_database, "makemigrations", "--check", "--dry-run")
    assert check.returncode == 0, f"{engine}: a model change has no migration:\n{check.stdout}"
