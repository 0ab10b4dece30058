"""A tiny HTTP client for the HTTP data plane tests (the standard library's, no extra package),
and the Instance rows those tests route to."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    raw: bytes
    json: Any = field(init=False)

    def __post_init__(self) -> None:
        try:
            self.json = json.loads(self.raw) if self.raw else None
        except ValueError:
            self.json = None


def request(
    url: str,
    body: Any = None,
    *,
    method: str | None = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 60,
) -> Reply:
    """POST `body` as JSON (or `raw` bytes); GET when neither is given."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    sent = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Reply(response.status, {k.lower(): v for k, v in response.headers.items()},
                         response.read())  # fmt: skip
    except urllib.error.HTTPError as error:
        return Reply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


_PROMETHEUS_PORTS = itertools.count(2)  # unique per node; nothing listens on them


def add_row(name: str, model_id: str, port: int, **fields: Any) -> Any:
    """A running Instance row on a node no test worker serves (nothing reconciles it)."""
    from instances.models import Instance

    values: dict[str, Any] = {
        "prometheus_port": next(_PROMETHEUS_PORTS),
        "status": "running",
        "node": "http-tests",
    }
    values.update(fields)
    return Instance.objects.create(name=name, model_id=model_id, port=port, **values)
