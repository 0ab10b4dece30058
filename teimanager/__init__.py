"""TEI Manager: a control plane and a gRPC data plane for many TEI instances."""

from teimanager.celery import app as celery_app

__all__ = ["celery_app"]
