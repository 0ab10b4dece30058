"""TEI Manager configuration: defaults, then an optional TOML file, then the environment.

Env overrides file; file overrides defaults; a bad value raises ConfigError naming the key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the key."""


@dataclass(frozen=True)
class MtlsConfig:
    ca_cert: str = ""
    server_cert: str = ""
    server_key: str = ""
    allowed_subjects: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.server_cert and self.server_key)


@dataclass(frozen=True)
class Config:
    api_port: int = 9000
    grpc_port: int = 9001
    grpc_enabled: bool = True
    health_check_interval_secs: int = 5
    startup_timeout_secs: int = 300
    max_failures_before_restart: int = 3
    graceful_shutdown_timeout_secs: int = 10
    auto_restore_on_restart: bool = True
    max_instances: int = 100
    instance_port_start: int = 8080
    instance_port_end: int = 8179
    prometheus_port_start: int = 9100
    prometheus_port_end: int = 9199
    tei_binary_path: str = ""
    grpc_max_message_size_mb: int = 64
    grpc_max_parallel_streams: int = 1024
    grpc_request_timeout_secs: float = 30.0
    http_enabled: bool = True
    http_port: int = 9003
    http_payload_limit_bytes: int = 2_000_000
    max_client_batch_size: int = 2048
    queue_size: int = 1024
    state_file: str = "var/state.sqlite3"
    log_dir: str = "var/logs"
    mtls: MtlsConfig = field(default_factory=MtlsConfig)
    instances: tuple[dict[str, Any], ...] = ()


# key in the TOML file -> environment variable that overrides it
ENV_OVERRIDES = {
    "api_port": "TEI_MANAGER_API_PORT",
    "grpc_port": "TEI_MANAGER_GRPC_PORT",
    "grpc_enabled": "TEI_MANAGER_GRPC_ENABLED",
    "http_enabled": "TEI_MANAGER_HTTP_ENABLED",
    "http_port": "TEI_MANAGER_HTTP_PORT",
    "http_payload_limit_bytes": "TEI_MANAGER_HTTP_PAYLOAD_LIMIT",
    "max_client_batch_size": "TEI_MANAGER_MAX_CLIENT_BATCH_SIZE",
    "queue_size": "TEI_MANAGER_QUEUE_SIZE",
    "health_check_interval_secs": "TEI_MANAGER_HEALTH_CHECK_INTERVAL",
    "state_file": "TEI_MANAGER_STATE_FILE",
    "log_dir": "TEI_MANAGER_LOG_DIR",
    "tei_binary_path": "TEI_BINARY_PATH",
}

_PORT_KEYS = {
    "api_port",
    "grpc_port",
    "http_port",
    "instance_port_start",
    "instance_port_end",
    "prometheus_port_start",
    "prometheus_port_end",
}
_INSTANCE_KEYS = {
    "name",
    "model_id",
    "port",
    "gpu_id",
    "max_batch_tokens",
    "max_concurrent_requests",
    "pooling",
    "prometheus_port",
    "startup_timeout_secs",
    "extra_args",
}


def load_config(path: str | None = None, env: dict[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the TOML file at `path`, and `env`."""
    env = dict(os.environ if env is None else env)
    path = path or env.get("TEI_MANAGER_CONFIG") or None
    values: dict[str, Any] = {}
    if path:
        values = _read_toml(Path(path))
    for key, var in ENV_OVERRIDES.items():
        if env.get(var, "") != "":
            values[key] = env[var]
    return _build(values)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def _build(values: dict[str, Any]) -> Config:
    defaults = Config()
    known = {f for f in Config.__dataclass_fields__ if f not in ("mtls", "instances")}
    kwargs: dict[str, Any] = {}
    for key, raw in values.items():
        if key in ("auth", "instances"):
            continue
        if key not in known:
            raise ConfigError(f"unknown config key '{key}'")
        kwargs[key] = coerce(key, raw, type(getattr(defaults, key)))
    kwargs["mtls"] = _build_mtls(values.get("auth", {}))
    kwargs["instances"] = _build_seeds(values.get("instances", []))
    config = Config(**kwargs)
    _check_ranges(config)
    return config


def coerce(key: str, raw: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"config key '{key}' must be a boolean, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"config key '{key}' must be a number, got {raw!r}")
        try:
            number = kind(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number, got {raw!r}") from None
        if number < 0 or (key in _PORT_KEYS and not 1 <= number <= 65535):
            raise ConfigError(f"config key '{key}' is out of range: {raw!r}")
        return number
    if not isinstance(raw, str):
        raise ConfigError(f"config key '{key}' must be a string, got {raw!r}")
    return raw


def _build_mtls(auth: Any) -> MtlsConfig:
    if not isinstance(auth, dict):
        raise ConfigError("config key 'auth' must be a table")
    mtls = auth.get("mtls", {})
    if not isinstance(mtls, dict):
        raise ConfigError("config key 'auth.mtls' must be a table")
    unknown = set(mtls) - {"ca_cert", "server_cert", "server_key", "allowed_subjects"}
    if unknown:
        raise ConfigError(f"unknown config key 'auth.mtls.{sorted(unknown)[0]}'")
    subjects = mtls.get("allowed_subjects", [])
    if not isinstance(subjects, list) or not all(isinstance(s, str) for s in subjects):
        raise ConfigError("config key 'auth.mtls.allowed_subjects' must be a list of strings")
    config = MtlsConfig(
        ca_cert=str(mtls.get("ca_cert", "")),
        server_cert=str(mtls.get("server_cert", "")),
        server_key=str(mtls.get("server_key", "")),
        allowed_subjects=tuple(subjects),
    )
    if mtls and not (config.ca_cert and config.server_cert and config.server_key):
        raise ConfigError("config key 'auth.mtls' needs ca_cert, server_cert and server_key")
    return config


def _build_seeds(seeds: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(seeds, list):
        raise ConfigError("config key 'instances' must be an array of tables ([[instances]])")
    for index, seed in enumerate(seeds):
        if not isinstance(seed, dict):
            raise ConfigError(f"config key 'instances[{index}]' must be a table")
        unknown = set(seed) - _INSTANCE_KEYS
        if unknown:
            raise ConfigError(f"unknown config key 'instances[{index}].{sorted(unknown)[0]}'")
        for required in ("name", "model_id"):
            if not seed.get(required):
                raise ConfigError(f"config key 'instances[{index}].{required}' is required")
    return tuple(seeds)


def _check_ranges(config: Config) -> None:
    if config.instance_port_start > config.instance_port_end:
        raise ConfigError("config key 'instance_port_start' is above 'instance_port_end'")
    if config.prometheus_port_start > config.prometheus_port_end:
        raise ConfigError("config key 'prometheus_port_start' is above 'prometheus_port_end'")
    if config.health_check_interval_secs < 1:
        raise ConfigError("config key 'health_check_interval_secs' must be at least 1")
    if config.max_instances < 1:
        raise ConfigError("config key 'max_instances' must be at least 1")
    if config.grpc_request_timeout_secs <= 0:
        raise ConfigError("config key 'grpc_request_timeout_secs' must be above 0")
    for key in ("http_payload_limit_bytes", "max_client_batch_size"):
        if getattr(config, key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1")
