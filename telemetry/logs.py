"""Log lines: the plain format, or one JSON object per line (`log_format = "json"`,
TEI_MANAGER_LOG_FORMAT), for web, worker, beat and the multiplexer alike.

Every line carries the process's role (`service`), the request id of the request it was
written for (`request_id`: the web request, the task that request enqueued, the data plane
request; null outside one) and, while a span is current, its `trace_id` and `span_id`, so
a log line leads to its trace and back. Importable without Django (gunicorn's config
reads it before any app is loaded).
"""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from typing import Any

REQUEST_ID: ContextVar[str | None] = ContextVar("tei_manager_request_id", default=None)
REQUEST_ID_HEADER = "x-request-id"
FORMATS = ("text", "json")
_SAFE_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_service = "tei-manager"


def set_service(name: str) -> None:
    """Name this process in its log lines: web, worker, beat, multiplexer."""
    global _service
    _service = name


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted_request_id(value: str | None) -> str | None:
    """A client's X-Request-ID, if it is a plain token of at most 128 characters: anything
    else (a line break, a megabyte) is not written to the logs as it came."""
    if value and _SAFE_ID.fullmatch(value):
        return value
    return None


class ContextFilter(logging.Filter):
    """Adds service, request_id, trace_id and span_id to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        from telemetry import tracing

        record.service = _service
        record.request_id = REQUEST_ID.get()
        record.trace_id, record.span_id = tracing.current_ids()
        return True


def logging_config(log_format: str, level: str) -> dict[str, Any]:
    """The `logging.config.dictConfig` dictionary of every process (Django's LOGGING)."""
    formatter = "json" if log_format == "json" else "plain"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": "telemetry.logs.ContextFilter"}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
            "json": {
                "()": "pythonjsonlogger.json.JsonFormatter",
                "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s",
                "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
            },
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["context"],
            }
        },
        "root": {"handlers": ["console"], "level": level.upper()},
    }


def gunicorn_logging_config(log_format: str, level: str) -> dict[str, Any]:
    """gunicorn's own loggers (errors, access lines) through the same handler."""
    config = logging_config(log_format, level)
    config["loggers"] = {
        name: {"handlers": ["console"], "level": "INFO", "propagate": False}
        for name in ("gunicorn.error", "gunicorn.access")
    }
    return config
