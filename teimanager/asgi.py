"""ASGI entry point for gunicorn's asgi worker."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
application = get_asgi_application()
