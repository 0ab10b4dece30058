"""Celery application: JSON only, explicit time limits, the reconcile tick on beat."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")

app = Celery("teimanager")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
