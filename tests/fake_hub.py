"""A local Hugging Face Hub for download tests: serves model folders the way the Hub's
file API does, so huggingface_hub's real download code runs against it.

- `GET /api/models/{repo}/revision/{rev}`: the repo's info (`sha`, `siblings` with sizes);
- `GET /api/models/{repo}/tree/{rev}`: its files (`type`, `path`, `size`, `oid`);
- `HEAD`/`GET /{repo}/resolve/{rev}/{file}`: the file, with `ETag`, `X-Repo-Commit` and
  `Content-Length`, honouring `Range: bytes=N-` (resumed downloads).

`FakeHub(repos)` (repo id -> folder) is a context manager; `.url` is its endpoint,
`.bytes_per_sec` throttles file bodies (0: full speed), `.requests` lists what was asked.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

SHA = "a" * 40
CHUNK = 64 * 1024


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.bytes_per_sec = 0
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hub.serve(self, body=True)

            def do_HEAD(self) -> None:  # noqa: N802
                hub.serve(self, body=False)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo: str) -> list[Path]:
        root = self.repos[repo]
        return sorted(p for p in root.rglob("*") if p.is_file())

    def serve(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(request.path).path)
        self.requests.append((request.command, path, request.headers.get("Range", "")))
        try:
            if path.startswith("/api/models/"):
                self._api(request, path.removeprefix("/api/models/"))
            else:
                self._resolve(request, path.lstrip("/"), body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _repo(self, rest: str, separator: str) -> tuple[str, str] | None:
        for repo in self.repos:
            if rest.startswith(repo + separator):
                return repo, rest[len(repo) + len(separator) :]
        return None

    def _api(self, request: BaseHTTPRequestHandler, rest: str) -> None:
        if (found := self._repo(rest, "/revision/")) is not None:
            repo = found[0]
            siblings = [
                {"rfilename": self._name(repo, p), "size": p.stat().st_size, "blobId": _oid(p)}
                for p in self.files(repo)
            ]
            self._json(request, {"id": repo, "modelId": repo, "sha": SHA, "siblings": siblings})
        elif (found := self._repo(rest, "/tree/")) is not None:
            repo = found[0]
            entries = [
                {
                    "type": "file",
                    "path": self._name(repo, p),
                    "size": p.stat().st_size,
                    "oid": _oid(p),
                }
                for p in self.files(repo)
            ]
            self._json(request, entries)
        else:
            self._missing(request)

    def _resolve(self, request: BaseHTTPRequestHandler, rest: str, body: bool) -> None:
        found = self._repo(rest, "/resolve/")
        if found is None:
            return self._missing(request)
        repo, tail = found
        _revision, _, name = tail.partition("/")
        path = self.repos[repo] / name
        if not path.is_file():
            return self._missing(request)
        data = path.read_bytes()
        start = 0
        ranged = request.headers.get("Range", "")
        if ranged.startswith("bytes="):
            start = int(ranged.removeprefix("bytes=").split("-")[0] or 0)
        request.send_response(206 if start else 200)
        request.send_header("ETag", f'"{_oid(path)}"')
        request.send_header("X-Repo-Commit", SHA)
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("Content-Length", str(len(data) - start))
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.end_headers()
        if body:
            for offset in range(start, len(data), CHUNK):
                request.wfile.write(data[offset : offset + CHUNK])
                if self.bytes_per_sec:
                    time.sleep(CHUNK / self.bytes_per_sec)

    def _name(self, repo: str, path: Path) -> str:
        return path.relative_to(self.repos[repo]).as_posix()

    def _json(self, request: BaseHTTPRequestHandler, payload: Any) -> None:
        data = json.dumps(payload).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _missing(self, request: BaseHTTPRequestHandler) -> None:
        data = b'{"error": "Repository not found"}'
        request.send_response(404)
        request.send_header("X-Error-Code", "RepoNotFound")
        request.send_header("X-Error-Message", "Repository not found")
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)


def _oid(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()  # noqa: S324 - git's blob id is SHA-1
