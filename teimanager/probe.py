"""Liveness probes for a supervisor: `python -m teimanager.probe web|multiplexer|beat`.

Exit 0 when that one process is alive, 1 when it is not, with one line saying why. This
is not /health's question (is the whole stack well?): a web process whose /health answers
503 because the multiplexer is down is alive, and restarting it would not help. So:

- `web`: /health answers at all, whatever its status (HTTP on 127.0.0.1:api_port);
- `multiplexer`: grpc.health.v1 says SERVING on 127.0.0.1:grpc_port (with mTLS, where a
  plaintext probe cannot pass, the port accepts connections); alive when gRPC is disabled;
- `beat`: its own heartbeat is fresh by /health's rule (instances/health.py).

docker/compose.yml's healthchecks run these; a worker is probed with `celery inspect ping`.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime

from teimanager.config import Config, load_config_or_exit

TIMEOUT_SECS = 5.0


class NotAlive(Exception):
    """The probed process does not answer; the message says how."""


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in PROBES:
        sys.stderr.write(f"usage: python -m teimanager.probe {{{'|'.join(PROBES)}}}\n")
        return 2
    config = load_config_or_exit()
    try:
        message = PROBES[argv[0]](config)
    except NotAlive as exc:
        print(f"{argv[0]}: not alive: {exc}")
        return 1
    print(f"{argv[0]}: alive: {message}")
    return 0


def probe_web(config: Config) -> str:
    url = f"http://{_local(config.bind)}:{config.api_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECS) as response:
            status = response.status
    except urllib.error.HTTPError as exc:  # it answered: alive, whatever it said
        status = exc.code
    except (OSError, ValueError) as exc:
        raise NotAlive(f"{url} does not answer: {exc}") from None
    return f"{url} answered {status}"


def probe_multiplexer(config: Config) -> str:
    if not config.grpc_enabled:
        return "gRPC is disabled (TEI_MANAGER_GRPC_ENABLED=false)"
    host = _local(config.grpc_host or config.bind)
    if config.mtls.enabled:
        try:
            socket.create_connection((host, config.grpc_port), timeout=TIMEOUT_SECS).close()
        except OSError as exc:
            raise NotAlive(f"{host}:{config.grpc_port} refuses connections: {exc}") from None
        return f"{host}:{config.grpc_port} accepts connections (mTLS)"
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{config.grpc_port}"
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_SECS
            )
        except grpc.RpcError as exc:
            raise NotAlive(f"{target} does not answer: {exc.code().name}") from None  # type: ignore[attr-defined]
    state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise NotAlive(f"{target} is {state}")
    return f"{target} is {state}"


def probe_beat(config: Config) -> str:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "teimanager.settings")
    django.setup()
    from instances import health
    from instances.heartbeats import BEAT

    # No start-up grace here: the supervisor's own start period covers a booting beat.
    verdict = health.evaluate(up_since=datetime.min.replace(tzinfo=UTC))
    if verdict.database_error:
        raise NotAlive(f"cannot read its heartbeat: {verdict.database_error}")
    part = verdict.part(BEAT)
    assert part is not None
    if part.state != health.OK:
        seen = f"last {part.last_seen.isoformat()}" if part.last_seen else "never seen"
        raise NotAlive(f"no heartbeat within {part.limit_secs:g}s ({seen})")
    return f"last heartbeat {part.last_seen.isoformat() if part.last_seen else ''}"


PROBES: dict[str, Callable[[Config], str]] = {
    "web": probe_web,
    "multiplexer": probe_multiplexer,
    "beat": probe_beat,
}


def _local(bind: str) -> str:
    """Where to reach a process bound to `bind` from the same host."""
    return "127.0.0.1" if bind in ("", "0.0.0.0", "::") else bind


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
