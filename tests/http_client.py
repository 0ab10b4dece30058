"""Helpers of the data plane tests: a tiny HTTP client (the standard library's), the Instance
rows the tests route to, and a stand-in instance that holds its calls until released."""

from __future__ import annotations

import itertools
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from tei.v1 import tei_pb2


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


class HoldingInstance:
    """A tei.v1 Embed instance that answers a call only once `release()` is called."""

    def __init__(self) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=40))
        self.gate = threading.Event()
        self.seen = 0
        handlers = {
            "Embed": grpc.unary_unary_rpc_method_handler(self._embed),
            "EmbedStream": grpc.stream_stream_rpc_method_handler(self._embed_stream),
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("tei.v1.Embed", handlers),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def release(self) -> None:
        self.gate.set()

    def _answer(self) -> bytes:
        self.seen += 1
        self.gate.wait(30)
        return tei_pb2.EmbedResponse(embeddings=[1.0, 2.0]).SerializeToString()

    def _embed(self, request: bytes, context: Any) -> bytes:
        return self._answer()

    def _embed_stream(self, requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            yield self._answer()
