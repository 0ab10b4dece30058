"""The `web` worker: gunicorn's asyncio (ASGI) worker, whose own refusals are the API's
envelope too.

gunicorn answers some requests before Django sees them: a request line over
`limit_request_line` (414), headers over their limits (431), a request it cannot parse
(400). Its answer is text; here it is `{"error", "code", "timestamp"}` like every other
error of the API.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from gunicorn.asgi.protocol import ASGIProtocol
from gunicorn.workers import gasgi


class EnvelopeProtocol(ASGIProtocol):
    def _send_error_response(
        self, status: int, message: str, extra_headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        from instances.api.errors import http_error  # after Django is set up

        body = json.dumps(http_error(status, message)).encode()
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        extra = "".join(f"{name}: {value}\r\n" for name, value in extra_headers)
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"{extra}"
            "Connection: close\r\n"
            "\r\n"
        )
        self._safe_write(head.encode("latin-1") + body)


class Worker(gasgi.ASGIWorker):
    def init_process(self) -> Any:
        # The asgi worker builds each connection's protocol from this module-level name.
        gasgi.ASGIProtocol = EnvelopeProtocol  # type: ignore[misc]
        return super().init_process()
