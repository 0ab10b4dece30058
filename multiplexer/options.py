"""The multiplexer's server options.

Apart from multiplexer/server.py so that `runmultiplexer --processes N` can read them in
its parent process without importing the server (grpcio's server, pyarrow and its threads):
the parent forks the server processes, and must do so before any of that exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from teimanager.config import Config, MtlsConfig, is_loopback

# Seconds between two traffic samples per instance (multiplexer/rollup.py).
ROLLUP_SECS = 10.0


@dataclass(frozen=True)
class ServerOptions:
    host: str = "0.0.0.0"
    port: int = 9001
    max_message_size_mb: int = 64
    max_parallel_streams: int = 1024
    request_timeout_secs: float = 30.0
    refresh_interval_secs: float = 0.5
    mtls: MtlsConfig = field(default_factory=MtlsConfig)
    queue_size: int = 1024
    http_port: int | None = None  # None: no HTTP server; 0: any free port
    http_payload_limit_bytes: int = 2_000_000
    max_client_batch_size: int = 2048
    # `runmultiplexer --processes N`: N servers share the ports (SO_REUSEPORT), each admits
    # its share of an instance's max_concurrent_requests, and one writes the heartbeat.
    processes: int = 1
    reuse_port: bool = False
    heartbeat: bool = True
    # Protected mode (access/protection.py): "auto" asks for keys once a key exists or a
    # listener binds beyond loopback, this one or another of the fleet's (`listeners`).
    auth_required: str = "auto"
    listeners: tuple[str, ...] = ()
    rollup_interval_secs: float = ROLLUP_SECS  # 0: no traffic samples
    node: str = ""  # names this multiplexer's traffic samples ("": the host name)
    # How long a call without a deadline waits for an on-demand start; 0: no cold starts.
    on_demand_wait_secs: float = 300.0

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ServerOptions:
        values: dict[str, Any] = {
            "port": config.grpc_port,
            "max_message_size_mb": config.grpc_max_message_size_mb,
            "max_parallel_streams": config.grpc_max_parallel_streams,
            "request_timeout_secs": config.grpc_request_timeout_secs,
            "mtls": config.mtls,
            "queue_size": config.queue_size,
            "http_port": config.http_port if config.http_enabled else None,
            "http_payload_limit_bytes": config.http_payload_limit_bytes,
            "max_client_batch_size": config.max_client_batch_size,
            "auth_required": config.auth_required,
            "listeners": (config.bind,),
            "on_demand_wait_secs": config.on_demand_wait_secs or config.startup_timeout_secs,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def open_listener(self) -> bool:
        return any(not is_loopback(host) for host in (self.host, *self.listeners))

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_size_mb * 1024 * 1024

    def message_size_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]
