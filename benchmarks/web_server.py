"""Web server benchmark (`make bench`): writes benchmarks/results/web_server.md.

The `web` process as the Procfile starts it (gunicorn's asyncio worker) against the
threaded worker it replaced (gthread, 2 workers x 4 threads), same config otherwise:

1. /health while 16 clients dribble their headers (a request line, then one byte every
   0.5 s, never finishing): latency of 10 requests, one after the other, 10 s timeout.
2. GET /instances/<name> throughput: 8 clients on kept-alive connections, 100 requests each.

It runs on its own SQLite file and a free port, next to anything else.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(tempfile.mkdtemp(prefix="teimanager-bench-web-"))
SLOW_CLIENTS = 16
LOG = open(WORK / "gunicorn.log", "ab")  # noqa: SIM115
THREADED = ["--worker-class", "gthread", "--threads", "4"]


def main() -> None:
    env = {
        **os.environ,
        "TEI_MANAGER_CONFIG": "",
        "TEI_MANAGER_STATE_FILE": str(WORK / "state.sqlite3"),
        "TEI_MANAGER_LOG_DIR": str(WORK / "logs"),
        "TEI_MANAGER_BIND": "127.0.0.1",
        "TEI_MANAGER_WEB_WORKERS": "2",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/14",
        "CELERY_TASK_DEFAULT_QUEUE": f"bench-web-{os.getpid()}",
        "TEI_MANAGER_NODE": f"bench-web-{os.getpid()}",  # no worker: nothing launches
    }
    manage = [sys.executable, "manage.py", "migrate", "--noinput", "-v0"]
    subprocess.run(manage, cwd=ROOT, env=env, check=True)
    web = shlex.split(next(line for line in (ROOT / "Procfile").read_text().splitlines()
                           if line.startswith("web:")).partition(":")[2])[1:]  # fmt: skip
    rows = []
    threaded = [("teimanager.wsgi" if arg == "teimanager.asgi" else arg) for arg in web] + THREADED
    for label, args in [("asyncio (Procfile)", web), ("gthread 2 x 4 (before)", threaded)]:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", *args, "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT, env=env, stdout=LOG, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_ready(port)
            slow = health_under_slow_clients(port)
            rate = throughput(port)
        finally:
            server.terminate()
            server.wait(30)
        rows.append(f"| {label} | {slow} | {rate:.0f} req/s |")
    report = "\n".join(
        [
            "# Web server benchmark",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
            "2 gunicorn workers, SQLite.",
            "",
            f"| worker | /health with {SLOW_CLIENTS} slow clients (10 calls) | "
            "GET /instances/<name>, 8 clients |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )
    out = ROOT / "benchmarks" / "results" / "web_server.md"
    out.write_text(report)
    print(report)


def health_under_slow_clients(port: int) -> str:
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(SLOW_CLIENTS)]
    stop = threading.Event()

    def dribble() -> None:
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        while not stop.wait(0.5):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X")

    dribbler = threading.Thread(target=dribble, daemon=True)
    dribbler.start()
    time.sleep(1.5)
    times, failed = [], 0
    try:
        for _ in range(10):
            started = time.monotonic()
            try:
                get(port, "/health", timeout=10)
                times.append(time.monotonic() - started)
            except OSError:
                failed += 1
    finally:
        stop.set()
        dribbler.join()
        for sock in slow:
            sock.close()
    answered = f"p50 {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms"
    return (answered if times else "none answered") + (f"; {failed} timed out" if failed else "")


def throughput(port: int) -> float:
    body = json.dumps({"name": "bench", "model_id": "org/model"}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("POST", "/instances", body, {"Content-Type": "application/json"})
    connection.getresponse().read()

    def client() -> None:
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for _ in range(100):
            kept.request("GET", "/instances/bench")
            response = kept.getresponse()
            response.read()
            assert response.status == 200, response.status

    clients = [threading.Thread(target=client) for _ in range(8)]
    started = time.monotonic()
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    elapsed = time.monotonic() - started
    connection.request("DELETE", "/instances/bench")
    connection.getresponse().read()
    return 800 / elapsed


def get(port: int, path: str, timeout: float) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(port, "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer on port {port}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
