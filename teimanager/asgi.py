"""ASGI entry point for gunicorn (`web`, see teimanager/gunicorn_conf.py).

Django under ASGI reads the whole request body (spooling it to disk) before any view runs,
so the body limit is applied here, as the bytes arrive: a body over
DATA_UPLOAD_MAX_MEMORY_SIZE gets 413 REQUEST_TOO_LARGE and is never stored. Nothing in
this API takes file uploads, so no honest request comes near it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after setup)

from instances.api.errors import body  # noqa: E402
from instances.errors import RequestTooLarge  # noqa: E402
from telemetry.setup import setup_process  # noqa: E402

# Each gunicorn worker imports this after the fork: its own exporter thread.
setup_process("web")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class _BodyTooLarge(Exception):
    pass


def limit_body(app: App, limit: int | None) -> App:
    """`app`, refusing request bodies over `limit` bytes (declared or as received)."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or limit is None:
            await app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _BodyTooLarge
            return message

        try:
            await app(scope, counted, send)
        except _BodyTooLarge:
            await _refuse(send, limit)  # Django reads the body before it answers

    return guarded


async def _refuse(send: Send, limit: int) -> None:
    error = RequestTooLarge(f"the request body is over {limit} bytes")
    content = json.dumps(body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    headers.append((b"content-length", str(len(content)).encode()))
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": content})


# WhiteNoise's static files are served from a sync iterator, which Django consumes in a
# thread under ASGI; that is fine for the admin's few small files, so no warning each time.
warnings.filterwarnings("ignore", "StreamingHttpResponse must consume synchronous iterators")
application = limit_body(django_application, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
