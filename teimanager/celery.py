"""Celery application: JSON only, explicit time limits, the reconcile tick on beat, the
worker's own heartbeat (instances/heartbeats.py), and each process's log name and tracing
(telemetry/setup.py); with TEI_MANAGER_LOG_FORMAT=json, Celery's own lines are the
project's JSON lines too."""

import logging.config
import os
from typing import Any

from celery import Celery, signals

from instances.heartbeats import WorkerHeartbeat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")

app = Celery("teimanager")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(WorkerHeartbeat)
app.autodiscover_tasks()


@signals.celeryd_init.connect
def name_the_worker(**kwargs: Any) -> None:
    from telemetry import logs

    logs.set_service("worker")


@signals.worker_process_init.connect
def set_up_the_pool_process(**kwargs: Any) -> None:
    # Tasks run here: the exporter's thread must be started after the fork.
    from telemetry.setup import setup_process

    setup_process("worker")


@signals.worker_process_shutdown.connect
def flush_spans(**kwargs: Any) -> None:
    from telemetry import tracing

    tracing.shutdown()


@signals.beat_init.connect
def name_beat(**kwargs: Any) -> None:
    from telemetry import logs

    logs.set_service("beat")


def use_project_logging(loglevel: Any = None, **kwargs: Any) -> None:
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


def _json_logs() -> bool:
    from django.conf import settings

    return bool(settings.TEI.log_format == "json")


if _json_logs():  # Celery leaves logging alone when someone answers setup_logging
    signals.setup_logging.connect(use_project_logging)
