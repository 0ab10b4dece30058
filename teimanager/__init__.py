"""TEI Manager: a control plane and a gRPC data plane for many TEI instances."""

from teimanager.celery import app as celery_app

__version__ = "0.1.0"
__all__ = ["__version__", "celery_app"]
