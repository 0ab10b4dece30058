"""Log lines on stdout as TEI writes them: text, or one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime


def configure_logging(json_output: bool) -> None:
    """Send every log record to stdout (the manager appends it to the instance's log)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_output else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    logging.captureWarnings(True)  # warnings become log lines too (one JSON object each)
    # Libraries talk a lot at INFO; their warnings still come through.
    for noisy in ("transformers", "huggingface_hub", "urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class TextFormatter(logging.Formatter):
    """`2024-05-01T12:00:00.123456Z  INFO localtei.server: Ready`, like TEI's default."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname:>5} {record.name}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """TEI's `--json-output` shape, with the message also at the top level."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return json.dumps(
            {
                "timestamp": _timestamp(record),
                "level": record.levelname,
                "message": message,
                "fields": {"message": message},
                "target": record.name,
            }
        )


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
