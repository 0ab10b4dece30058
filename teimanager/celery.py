"""Celery application: JSON only, explicit time limits, the reconcile tick on beat, and the
worker's own heartbeat (instances/heartbeats.py)."""

import os

from celery import Celery

from instances.heartbeats import WorkerHeartbeat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")

app = Celery("teimanager")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.steps["worker"].add(WorkerHeartbeat)
app.autodiscover_tasks()
