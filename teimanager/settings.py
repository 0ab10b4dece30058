"""Django settings for TEI Manager. Every value comes from teimanager/config.py."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import dj_database_url

from teimanager import secret_key
from teimanager.config import is_loopback, load_config_or_exit
from telemetry.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

# Every value below comes from here (teimanager/config.py): a bad one stops start-up with
# "TEI Manager configuration error: ..." and exit status 2, whichever process reads it.
TEI = load_config_or_exit()
DEBUG = TEI.debug
# A worker that exits stops its node's instances (Ctrl-C on `make run` leaves nothing).
STOP_INSTANCES_ON_EXIT = TEI.stop_instances_on_exit


def default_allowed_hosts(bind: str) -> list[str]:
    """The names a request to this server may carry in its Host header when ALLOWED_HOSTS is
    unset: localhost and the bind address, or the machine's name when bound to every
    interface. Any other name (a DNS-rebinding attacker's, say) gets a 400."""
    hosts = ["localhost", "127.0.0.1", "[::1]"]
    if bind in ("0.0.0.0", "::", "[::]"):
        hosts.append(socket.gethostname())
    elif bind not in hosts:
        hosts.append(f"[{bind}]" if ":" in bind and not bind.startswith("[") else bind)
    return hosts


# Sessions and CSRF tokens are signed with SECRET_KEY: without one in the environment, a
# random key generated once into the state directory (every process of the node reads it).
STATE_FILE = Path(TEI.state_file)
try:
    SECRET_KEY = TEI.secret_key or secret_key.load_or_create(STATE_FILE.parent)
except secret_key.SecretKeyError as exc:
    sys.stderr.write(f"TEI Manager configuration error: {exc}; or set SECRET_KEY\n")
    raise SystemExit(2) from None
ALLOWED_HOSTS = list(TEI.allowed_hosts) or default_allowed_hosts(TEI.bind)
# Origins (scheme://host[:port]) besides the server's own that may POST to the admin and
# the API: the public URL when a proxy terminates TLS in front of gunicorn.
CSRF_TRUSTED_ORIGINS = list(TEI.csrf_trusted_origins)
# Session and CSRF cookies go over HTTPS only once the site is served beyond loopback (or
# behind a proxy that ends TLS for an https:// origin); browsers accept them on
# http://localhost too. TEI_MANAGER_SECURE_COOKIES=true/false forces it.
if TEI.secure_cookies == "auto":
    SECURE_COOKIES = not is_loopback(TEI.bind) or any(
        origin.startswith("https://") for origin in CSRF_TRUSTED_ORIGINS
    )
else:
    SECURE_COOKIES = TEI.secure_cookies == "true"
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = SECURE_COOKIES

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "rest_framework_api_key",
    "access",
    "instances",
    "nodes",
    "registry",
    "multiplexer",
    "telemetry",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "telemetry.middleware.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "teimanager.urls"
WSGI_APPLICATION = "teimanager.wsgi.application"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# SQLite by default: four processes write to it, so WAL, a busy timeout and IMMEDIATE
# transactions (a writer takes the lock up front instead of failing on upgrade).
if TEI.database_url:
    # No persistent connections: web runs Django under ASGI, where each request's sync code
    # runs in a thread of its own and a kept connection would outlive it (Django's advice).
    DATABASES = {"default": dj_database_url.parse(TEI.database_url, conn_max_age=0)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": str(STATE_FILE),
            "OPTIONS": {
                "timeout": 30,
                "transaction_mode": "IMMEDIATE",
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
            "TEST": {"NAME": TEI.test_db or None},
        }
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# Only for `collectstatic`: whitenoise serves from the apps (a missing root is a warning).
STATIC_ROOT = TEI.static_root or None
# gunicorn serves the admin's static files itself, straight from the apps: no collectstatic.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

LOG_DIR = Path(TEI.log_dir)
# The host this process runs on: instances created here belong to it, and its worker
# consumes the queue `node.<NODE_NAME>`.
NODE_NAME = TEI.node or socket.gethostname()
# The address the multiplexer and the health check dial for this node's instances.
INSTANCE_HOST = TEI.instance_host

REST_FRAMEWORK = {
    # An API key, or a staff user's admin session; who may do what: FleetAccess.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "access.rest.ApiKeyAuthentication",
        "access.rest.StaffSessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": [
        "instances.api.origin.SameOriginWrites",
        "instances.api.permissions.FleetAccess",
    ],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "instances.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["instances.api.parsers.JSONParser"],
}
SPECTACULAR_SETTINGS = {
    "TITLE": "TEI Manager API",
    "DESCRIPTION": "Create, start, stop and watch text-embeddings-inference instances.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its docs describe the API, they hold no data: open, like /health.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "instances.api.schema.forbid_unknown_fields",
    ],
    # Swagger UI's own files come from drf-spectacular-sidecar, served here: no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

CELERY_BROKER_URL = TEI.celery_broker_url
CELERY_TASK_DEFAULT_QUEUE = TEI.celery_task_default_queue
# A broker outage must not hang an API request: the next reconcile tick does the work.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2}
CELERY_BROKER_TRANSPORT_OPTIONS = {"socket_connect_timeout": 2, "socket_timeout": 5}
CELERY_RESULT_BACKEND = None
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_SOFT_TIME_LIMIT = 120
CELERY_TASK_TIME_LIMIT = 180
CELERY_TASK_ACKS_LATE = False
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True


# Plain lines, or JSON with the request id and trace ids (TEI_MANAGER_LOG_FORMAT=json).
LOGGING = logging_config(TEI.log_format, TEI.log_level)

CELERY_BEAT_SCHEDULE = {
    "reconcile": {
        "task": "instances.tasks.reconcile",
        "schedule": float(TEI.health_check_interval_secs),
        "options": {"expires": float(TEI.health_check_interval_secs)},
    },
    # The fleet's time series: instances by status, and pruning past 24 hours.
    "sample_fleet": {
        "task": "instances.tasks.sample_fleet",
        "schedule": 10.0,
        "options": {"expires": 10.0},
    },
}
