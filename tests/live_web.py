"""`LiveWeb`: the `web` line of the Procfile (gunicorn with teimanager/gunicorn_conf.py),
really running on a free loopback port against the test database, for the tests that are
about the HTTP server itself (slow clients, limits gunicorn enforces, Host headers)."""

from __future__ import annotations

import contextlib
import http.client
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.conftest import ROOT, SESSION_DIR, TEST_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def procfile_command(process: str) -> list[str]:
    for line in (ROOT / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name.strip() == process:
            return shlex.split(command)
    raise LookupError(f"no {process!r} line in the Procfile")


class LiveWeb:
    def __init__(self, name: str = "web", **env: str) -> None:
        self.port = free_port()
        self.log_file: Path = SESSION_DIR / f"gunicorn-{name}-{self.port}.log"
        self.env = {**os.environ, **TEST_ENV, "TEI_MANAGER_API_PORT": str(self.port), **env}
        self.env["TEI_MANAGER_BIND"] = "127.0.0.1"
        for key in ("ALLOWED_HOSTS", "DATABASE_URL", "PROMETHEUS_MULTIPROC_DIR"):
            if key not in TEST_ENV:  # TEST_ENV names the PostgreSQL test database, if any
                self.env.pop(key, None)
        self.env.update(env)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> LiveWeb:
        program, *args = procfile_command("web")
        assert program == "gunicorn"
        with self.log_file.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", *args],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                self.request("GET", "/health", timeout=2)
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not start:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, headers, body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def raw(self, data: bytes, timeout: float = 10) -> bytes:
        """Send `data` as it is on a fresh connection; what came back until it closed."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            with contextlib.suppress(OSError):
                sock.sendall(data)
            chunks = []
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            return b"".join(chunks)

    def __enter__(self) -> LiveWeb:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
