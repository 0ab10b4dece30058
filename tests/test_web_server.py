"""The `web` process as it runs (the Procfile's gunicorn line, on a free port): slow
clients, and the requests gunicorn or Django refuse before any view, all answered within
the API's envelope."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.live_web import LiveWeb

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def web(django_db_setup: None) -> Iterator[LiveWeb]:
    with LiveWeb("server") as server:
        yield server


def envelope(status: int, body: bytes, code: str) -> dict[str, Any]:
    data = json.loads(body)
    assert set(data) == {"error", "code", "timestamp"}, data
    assert data["code"] == code, (status, data)
    assert data["error"]
    return data


def test_health_answers_while_slow_clients_dribble_their_headers(web: LiveWeb) -> None:
    # More slow clients than the old 2 workers x 4 threads could hold: each sends a request
    # line, then one header byte every half second and never finishes.
    slow = [socket.create_connection(("127.0.0.1", web.port)) for _ in range(16)]
    stop = threading.Event()

    def dribble() -> None:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(120):  # at most a minute
            if stop.wait(0.5):
                return
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    try:
        time.sleep(1.5)  # every slow client is connected and mid-headers
        for _ in range(3):
            status, _, body = web.request("GET", "/health", timeout=5)
            # Its verdict: 503 here, where no beat or worker writes heartbeats.
            assert status in (200, 503) and b'"heartbeats"' in body, body
    finally:
        stop.set()
        dribbler.join()
        for sock in slow:
            sock.close()


def test_it_answers_an_over_long_url_with_the_envelope(web: LiveWeb) -> None:
    status, headers, body = web.request("GET", "/instances/" + "a" * 10_000)
    assert status == 414
    assert headers["Content-Type"] == "application/json"
    envelope(status, body, "URI_TOO_LONG")


def test_it_answers_over_large_headers_with_the_envelope(web: LiveWeb) -> None:
    status, _, body = web.request("GET", "/health", headers={"X-Big": "b" * 10_000})
    assert status == 431
    envelope(status, body, "HEADERS_TOO_LARGE")


def test_it_answers_an_unreadable_request_with_the_envelope(web: LiveWeb) -> None:
    reply = web.raw(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), reply
    envelope(400, body, "BAD_REQUEST")


def test_it_refuses_an_oversized_body_before_reading_it(web: LiveWeb) -> None:
    # Only the headers: the declared length is enough to refuse, no byte of it is awaited.
    head = (
        b"POST /instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 3000000\r\n\r\n"
    )
    status_line, _, body = web.raw(head).partition(b"\r\n\r\n")
    assert status_line.startswith(b"HTTP/1.1 413"), status_line
    envelope(413, body, "REQUEST_TOO_LARGE")


def test_it_refuses_an_oversized_chunked_body(web: LiveWeb) -> None:
    # No length announced: refused once 2.5 MiB have come, without waiting for the end.
    chunk = b"x" * 65536
    request = (
        b"POST /instances HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(41))  # 2.6 MiB
    )
    head, _, body = web.raw(request).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    envelope(413, body, "REQUEST_TOO_LARGE")


def test_it_refuses_a_host_it_does_not_serve(web: LiveWeb) -> None:
    # A DNS-rebinding page reaches the server under its own name: ALLOWED_HOSTS defaults
    # to the bind address and localhost, not "*".
    status, headers, body = web.request("GET", "/instances", headers={"Host": "attacker.example"})
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    envelope(status, body, "DISALLOWED_HOST")
    create = json.dumps({"name": "rebound", "model_id": "org/model"}).encode()
    status, _, body = web.request(
        "POST",
        "/instances",
        create,
        headers={"Host": "attacker.example", "Content-Type": "application/json"},
    )
    envelope(status, body, "DISALLOWED_HOST")
    for host in (f"127.0.0.1:{web.port}", f"localhost:{web.port}", "localhost"):
        assert web.request("GET", "/instances", headers={"Host": host})[0] == 200, host


def test_it_refuses_a_cross_origin_start_and_serves_curl(web: LiveWeb) -> None:
    # The request of the report: a text/plain body, which needs no CORS preflight.
    evil = {"Origin": "http://evil.example", "Content-Type": "text/plain"}
    status, _, body = web.request("POST", "/instances/x/start", b"x", headers=evil)
    assert status == 403
    envelope(status, body, "CROSS_ORIGIN_REQUEST")
    # curl -X POST with no body and no Origin gets as far as the instance lookup.
    status, _, body = web.request("POST", "/instances/x/start")
    envelope(status, body, "INSTANCE_NOT_FOUND")
    same = {"Origin": f"http://127.0.0.1:{web.port}", "Sec-Fetch-Site": "same-origin"}
    status, _, body = web.request("POST", "/instances/x/start", headers=same)
    envelope(status, body, "INSTANCE_NOT_FOUND")


def test_it_serves_static_files_and_swagger_ui_from_here(web: LiveWeb) -> None:
    status, _, page = web.request("GET", "/api/docs")
    assert status == 200
    text = page.decode()
    assert "cdn" not in text.lower() and "//unpkg" not in text
    assets = [part.split('"')[0] for part in text.split('src="')[1:]]
    assert any("swagger-ui-bundle" in asset for asset in assets), assets
    for asset in assets:
        assert asset.startswith("/static/"), asset
        assert web.request("GET", asset)[0] == 200, asset
    assert web.request("GET", "/static/admin/css/base.css")[0] == 200
