"""Celery tasks of the registry (thin: the work is in downloads.py and verify.py). They
go to the queue of the node that asked (the files land in that host's cache)."""

from __future__ import annotations

from typing import Any

from celery import shared_task, signals
from django.conf import settings

# A download may run for hours; its own limit is download_timeout_secs.
_LONG = {"soft_time_limit": None, "time_limit": None}


@shared_task(name="registry.tasks.download_model", ignore_result=True, **_LONG)
def download_model(pk: int, token: str) -> None:
    from registry import downloads

    downloads.run(pk, token)


@shared_task(name="registry.tasks.verify_model", ignore_result=True, **_LONG)
def verify_model(pk: int, token: str) -> None:
    from registry import verify

    verify.run(pk, token)


@signals.worker_ready.connect
def discover_models(**kwargs: Any) -> None:
    from django.db import connection

    from registry.discovery import discover
    from registry.downloads import recover

    try:
        discover()
        recover(settings.NODE_NAME)
    finally:
        # No connection held in the worker's main process: processes forked from it later
        # (pool processes, the embedded beat) must not share an SQLite connection.
        connection.close()
