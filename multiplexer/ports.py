"""The ports of `runmultiplexer --processes N`: proven free, then shared.

Each process binds the gRPC and HTTP ports with SO_REUSEPORT, and the kernel spreads
connections over them. SO_REUSEPORT would also let a second multiplexer of the same user
join them silently, and take half the connections (grpcio asks for it unless told not to).
So the parent first binds each port itself without SO_REUSEPORT, which fails while anything
listens there, and holds a startup lock per port until its processes listen, so that two
multiplexers starting at the same moment cannot both pass that test. The lock is an
abstract Unix socket: like a port, its name belongs to the network namespace, and the kernel
frees it when its holder dies.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import replace

from multiplexer.options import ServerOptions

LOCK_TIMEOUT_SECS = 30.0


class PortTaken(Exception):
    """A port is in use, or another multiplexer is starting on it; the message says which."""


def startup_lock(
    ports: Iterable[int],
    timeout: float = LOCK_TIMEOUT_SECS,
    on_wait: Callable[[str], None] | None = None,
) -> list[socket.socket]:
    """Hold the startup lock of each port (0, any free port, needs none); close the
    sockets to release. Waits up to `timeout` for another multiplexer's start."""
    held: list[socket.socket] = []
    try:
        for port in sorted({p for p in ports if p}):  # one order: no deadlock between two
            held.append(_lock(port, timeout, on_wait))
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


def _lock(port: int, timeout: float, on_wait: Callable[[str], None] | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    waited = False
    while True:
        try:
            sock.bind(lock_name(port))
            return sock
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                sock.close()
                raise
        if time.monotonic() > deadline:
            sock.close()
            raise PortTaken(
                f"another multiplexer has been starting on port {port} for {timeout:g} s"
            )
        if not waited and on_wait is not None:
            on_wait(f"Waiting for another multiplexer that is starting on port {port}…")
        waited = True
        time.sleep(0.1)


def lock_name(port: int) -> str:
    return f"\0tei-manager-multiplexer-port-{port}"


def claim_ports(options: ServerOptions) -> ServerOptions:
    """Prove that nothing listens on the gRPC and HTTP ports, by binding each without
    SO_REUSEPORT, and pick the free port for a port 0. Raises PortTaken naming the port."""
    port = probe(options.host, options.port, "gRPC, TEI_MANAGER_GRPC_PORT")
    http_port = options.http_port
    if http_port is not None:
        http_port = probe(options.host, http_port, "HTTP, TEI_MANAGER_HTTP_PORT")
    return replace(options, port=port, http_port=http_port, reuse_port=True)


def probe(host: str, port: int, what: str) -> int:
    """Bind host:port as a lone listener would (SO_REUSEADDR, as grpcio and aiohttp set it,
    so that a connection in TIME_WAIT does not count); return the port bound."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise PortTaken(f"cannot listen on {host}:{port} ({what}): {exc}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((*address[:1], port, *address[2:]))
            except OSError as exc:
                raise PortTaken(f"cannot listen on {host}:{port} ({what}): {exc}") from None
            port = sock.getsockname()[1]  # a port 0 becomes the port every process binds
    return port
