"""TEI Manager configuration: defaults, then an optional TOML file, then the environment.

Every setting the project reads is one field of `Config` below, declared with `setting()`:
its default, the environment variable that sets it, and whether the TOML file may set it
too. Nothing else in the project reads `os.environ` for configuration. Env overrides file;
file overrides defaults; a bad value raises ConfigError naming the key (and the variable
it came from); `load_config_or_exit()` turns that into one line on stderr and exit 2.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import dj_database_url


class ConfigError(Exception):
    """A configuration value is missing or malformed; the message names the key."""


# A setting that is decided from the deployment unless forced either way.
MODES = ("auto", "true", "false")
# Where a create without `node` goes: "spread" over the registered nodes that are up (the
# fewest instances first), or "local": the creating process's own node (TEI_MANAGER_NODE).
PLACEMENTS = ("spread", "local")


def _port(label: str, value: Any) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{label} must be a port (1-65535), got {value!r}")


def _port_or_off(label: str, value: Any) -> None:
    if value != 0:
        _port(label, value)


def _at_least_one(label: str, value: Any) -> None:
    if value < 1:
        raise ConfigError(f"{label} must be at least 1, got {value!r}")


def _above_zero(label: str, value: Any) -> None:
    if value <= 0:
        raise ConfigError(f"{label} must be above 0, got {value!r}")


def _ip_address(label: str, value: Any) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        # TEI binds every interface when --hostname is not an IP address.
        raise ConfigError(f"{label} must be an IP address, got {value!r}") from None


def _mode(label: str, value: Any) -> None:
    if value not in MODES:
        raise ConfigError(f"{label} must be one of {', '.join(MODES)}, got {value!r}")


def _node_timeout(label: str, value: Any) -> None:
    # Workers write their node's row every 5 s: a shorter timeout would flap.
    if value < 10:
        raise ConfigError(f"{label} must be at least 10 (seconds), got {value!r}")


def _placement(label: str, value: Any) -> None:
    if value not in PLACEMENTS:
        raise ConfigError(f"{label} must be one of {', '.join(PLACEMENTS)}, got {value!r}")


def _log_level(label: str, value: Any) -> None:
    if value.upper() not in logging.getLevelNamesMapping():
        names = ", ".join(("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
        raise ConfigError(f"{label} must be one of {names}, got {value!r}")


def _log_format(label: str, value: Any) -> None:
    if value not in ("text", "json"):
        raise ConfigError(f"{label} must be text or json, got {value!r}")


def _otlp_endpoint(label: str, value: Any) -> None:
    if value and not value.startswith(("http://", "https://")):
        raise ConfigError(f"{label} must be an http:// or https:// URL, got {value!r}")


def _database_url(label: str, value: Any) -> None:
    if value:
        try:
            dj_database_url.parse(value)
        except Exception as exc:
            raise ConfigError(f"{label} is not a database URL: {exc}") from None


def _broker_url(label: str, value: Any) -> None:
    if "://" not in value:
        raise ConfigError(f"{label} must be a URL such as redis://127.0.0.1:6379/0")


def setting(
    default: Any,
    env: str = "",
    *,
    file: bool = True,
    check: Callable[[str, Any], None] | None = None,
    secret: bool = False,
) -> Any:
    """One row of the table: a default, the variable that sets it, whether the TOML file
    may set it (under the field's name), and a check of the typed value."""
    metadata = {"env": env, "file": file, "check": check}
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


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
    # -- in the TOML file and the environment ------------------------------------------
    api_port: int = setting(9000, "TEI_MANAGER_API_PORT", check=_port)
    grpc_port: int = setting(9001, "TEI_MANAGER_GRPC_PORT", check=_port)
    grpc_enabled: bool = setting(True, "TEI_MANAGER_GRPC_ENABLED")
    health_check_interval_secs: int = setting(
        5, "TEI_MANAGER_HEALTH_CHECK_INTERVAL", check=_at_least_one
    )
    state_file: str = setting("var/state.sqlite3", "TEI_MANAGER_STATE_FILE")
    log_dir: str = setting("var/logs", "TEI_MANAGER_LOG_DIR")
    tei_binary_path: str = setting("", "TEI_BINARY_PATH")
    # The address instances listen on (`--hostname`); the multiplexer dials
    # TEI_MANAGER_INSTANCE_HOST, which may differ (a container's name, another host's).
    instance_bind: str = setting("127.0.0.1", "TEI_MANAGER_INSTANCE_BIND", check=_ip_address)
    # The HTTP data plane (in the multiplexer) and the admission queue.
    http_enabled: bool = setting(True, "TEI_MANAGER_HTTP_ENABLED")
    http_port: int = setting(9003, "TEI_MANAGER_HTTP_PORT", check=_port)
    http_payload_limit_bytes: int = setting(
        2_000_000, "TEI_MANAGER_HTTP_PAYLOAD_LIMIT", check=_at_least_one
    )
    max_client_batch_size: int = setting(
        2048, "TEI_MANAGER_MAX_CLIENT_BATCH_SIZE", check=_at_least_one
    )
    queue_size: int = setting(1024, "TEI_MANAGER_QUEUE_SIZE")  # 0: refuse when all are busy
    # Protected mode: "auto" asks for an API key once a listener binds beyond loopback or
    # any key exists; "true" and "false" force it either way (access/protection.py).
    auth_required: str = setting("auto", "TEI_MANAGER_AUTH_REQUIRED", check=_mode)
    # /metrics on the API port answers any peer without a key (else loopback peers only).
    metrics_public: bool = setting(False, "TEI_MANAGER_METRICS_PUBLIC")
    # Server processes of the multiplexer, sharing its ports (runmultiplexer --processes).
    multiplexer_processes: int = setting(
        1, "TEI_MANAGER_MULTIPLEXER_PROCESSES", check=_at_least_one
    )
    # Observability: log lines as text or JSON; OpenTelemetry spans to this OTLP/HTTP base
    # URL ("": no tracing).
    log_format: str = setting("text", "TEI_MANAGER_LOG_FORMAT", check=_log_format)
    otlp_endpoint: str = setting("", "OTEL_EXPORTER_OTLP_ENDPOINT", check=_otlp_endpoint)
    # Nodes: a node whose worker has not written its row for this long is down; a create
    # without `node` is placed as `placement` says; `failover` for a create that omits it.
    node_timeout_secs: int = setting(30, "TEI_MANAGER_NODE_TIMEOUT", check=_node_timeout)
    placement: str = setting("spread", "TEI_MANAGER_PLACEMENT", check=_placement)
    failover_default: bool = setting(False, "TEI_MANAGER_FAILOVER_DEFAULT")
    # The model registry: downloads go to this hub ("": huggingface_hub's own, which
    # HF_HUB_OFFLINE=1 turns off); every registered model starts on demand when true.
    hub_endpoint: str = setting("", "TEI_MANAGER_HUB_ENDPOINT", check=_otlp_endpoint)
    on_demand_default: bool = setting(False, "TEI_MANAGER_ON_DEMAND_DEFAULT")
    # -- in the TOML file only ---------------------------------------------------------
    # How long a call waits for an on-demand start without a deadline of its own (0: the
    # startup timeout).
    on_demand_wait_secs: float = setting(0.0)
    download_timeout_secs: int = setting(6 * 3600, check=_at_least_one)
    startup_timeout_secs: int = setting(300)
    max_failures_before_restart: int = setting(3)
    graceful_shutdown_timeout_secs: int = setting(10)
    auto_restore_on_restart: bool = setting(True)
    max_instances: int = setting(100, check=_at_least_one)
    instance_port_start: int = setting(8080, check=_port)
    instance_port_end: int = setting(8179, check=_port)
    prometheus_port_start: int = setting(9100, check=_port)
    prometheus_port_end: int = setting(9199, check=_port)
    grpc_max_message_size_mb: int = setting(64)
    grpc_max_parallel_streams: int = setting(1024)
    grpc_request_timeout_secs: float = setting(30.0, check=_above_zero)
    # An instance's log is rotated past this size, keeping this many backups (0: never).
    instance_log_max_bytes: int = setting(10 * 1024 * 1024)
    instance_log_backups: int = setting(5)
    # -- in the environment only -------------------------------------------------------
    bind: str = setting("127.0.0.1", "TEI_MANAGER_BIND", file=False)
    grpc_host: str = setting("", "TEI_MANAGER_GRPC_HOST", file=False)  # "": bind
    multiplexer_metrics_port: int = setting(
        9002, "TEI_MANAGER_MULTIPLEXER_METRICS_PORT", file=False, check=_port_or_off
    )
    node: str = setting("", "TEI_MANAGER_NODE", file=False)  # "": the hostname
    instance_host: str = setting("127.0.0.1", "TEI_MANAGER_INSTANCE_HOST", file=False)
    stop_instances_on_exit: bool = setting(True, "TEI_MANAGER_STOP_INSTANCES_ON_EXIT", file=False)
    web_workers: int = setting(2, "TEI_MANAGER_WEB_WORKERS", file=False, check=_at_least_one)
    static_root: str = setting("", "TEI_MANAGER_STATIC_ROOT", file=False)
    test_db: str = setting("", "TEI_MANAGER_TEST_DB", file=False)
    database_url: str = setting("", "DATABASE_URL", file=False, check=_database_url, secret=True)
    celery_broker_url: str = setting(
        "redis://127.0.0.1:6379/0", "CELERY_BROKER_URL", file=False, check=_broker_url, secret=True
    )
    celery_task_default_queue: str = setting("celery", "CELERY_TASK_DEFAULT_QUEUE", file=False)
    prometheus_multiproc_dir: str = setting("", "PROMETHEUS_MULTIPROC_DIR", file=False)
    debug: bool = setting(False, "DEBUG", file=False)
    log_level: str = setting("INFO", "LOG_LEVEL", file=False, check=_log_level)
    secret_key: str = setting("", "SECRET_KEY", file=False, secret=True)  # "": generated
    # Session and CSRF cookies marked Secure: "auto" does so when web is not on loopback.
    secure_cookies: str = setting("auto", "TEI_MANAGER_SECURE_COOKIES", file=False, check=_mode)
    allowed_hosts: tuple[str, ...] = setting((), "ALLOWED_HOSTS", file=False)  # (): local names
    csrf_trusted_origins: tuple[str, ...] = setting((), "CSRF_TRUSTED_ORIGINS", file=False)
    superuser_username: str = setting("admin", "DJANGO_SUPERUSER_USERNAME", file=False)
    superuser_password: str = setting("", "DJANGO_SUPERUSER_PASSWORD", file=False, secret=True)
    superuser_email: str = setting("", "DJANGO_SUPERUSER_EMAIL", file=False)
    # -- tables of the TOML file -------------------------------------------------------
    mtls: MtlsConfig = field(default_factory=MtlsConfig)
    instances: tuple[dict[str, Any], ...] = ()
    models: tuple[dict[str, Any], ...] = ()


# The variable that names the TOML file (`--config FILE` on manage.py sets it).
CONFIG_FILE_ENV = "TEI_MANAGER_CONFIG"
_TABLES = ("mtls", "instances", "models")


@dataclass(frozen=True)
class Key:
    """A row of the configuration table, as the README lists it."""

    name: str
    env: str
    in_file: bool
    kind: Any
    default: Any
    check: Callable[[str, Any], None] | None


def is_loopback(host: str) -> bool:
    """True when a server bound to `host` (an address or a name) is reachable from this
    machine only: `localhost`, 127.0.0.0/8, ::1. The wildcard and every other name is not."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def keys() -> list[Key]:
    """Every scalar setting, in declaration order."""
    hints = typing.get_type_hints(Config)
    rows = []
    for f in fields(Config):
        if f.name in _TABLES:
            continue
        default = f.default_factory() if callable(f.default_factory) else f.default
        meta = f.metadata
        rows.append(Key(f.name, meta["env"], meta["file"], hints[f.name], default, meta["check"]))
    return rows


def env_vars() -> dict[str, str]:
    """Environment variable -> config key, for every setting read from the environment."""
    return {key.env: key.name for key in keys() if key.env}


def load_config(path: str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, the TOML file at `path`, and `env`."""
    env = dict(os.environ if env is None else env)
    path = path or env.get(CONFIG_FILE_ENV) or None
    values: dict[str, Any] = {}
    if path:
        values = _read_toml(Path(path))
    table = {key.name: key for key in keys()}
    kwargs: dict[str, Any] = {}
    for name, raw in values.items():
        if name in ("auth", "instances", "models"):
            continue
        key = table.get(name)
        if key is None:
            raise ConfigError(f"unknown config key '{name}'")
        if not key.in_file:
            raise ConfigError(
                f"config key '{name}' cannot be set in the file; set {key.env} instead"
            )
        kwargs[name] = _typed(key, f"config key '{name}'", raw)
    for key in table.values():
        if key.env and env.get(key.env, "") != "":
            kwargs[key.name] = _typed(key, f"{key.env} ({key.name})", env[key.env])
    kwargs["mtls"] = _build_mtls(values.get("auth", {}))
    kwargs["instances"] = _build_seeds(values.get("instances", []))
    kwargs["models"] = _build_tables("models", values.get("models", []))
    config = Config(**kwargs)
    _check_ranges(config)
    return config


def load_config_or_exit() -> Config:
    """`load_config()` for an entry point: a bad value is one line on stderr and exit 2."""
    try:
        return load_config()
    except ConfigError as exc:
        sys.stderr.write(f"TEI Manager configuration error: {exc}\n")
        raise SystemExit(2) from None


def _typed(key: Key, label: str, raw: Any) -> Any:
    value = coerce(label, raw, key.kind)
    if key.check is not None:
        key.check(label, value)
    return value


def coerce(label: str, raw: Any, kind: Any) -> Any:
    """`raw` (a TOML value or an environment string) as `kind`; `label` names it in errors."""
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{label} must be a boolean, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{label} must be a number, got {raw!r}")
        try:
            number = kind(raw.strip() if isinstance(raw, str) else raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{label} must be a number, got {raw!r}") from None
        if number < 0:
            raise ConfigError(f"{label} is out of range: {raw!r}")
        return number
    if kind == tuple[str, ...]:
        if isinstance(raw, str):  # the environment: comma-separated
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        raise ConfigError(f"{label} must be a list of strings, got {raw!r}")
    if not isinstance(raw, str):
        raise ConfigError(f"{label} must be a string, got {raw!r}")
    return raw


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


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
    for name in ("ca_cert", "server_cert", "server_key"):
        if not isinstance(mtls.get(name, ""), str):
            raise ConfigError(f"config key 'auth.mtls.{name}' must be a file name")
    config = MtlsConfig(
        ca_cert=mtls.get("ca_cert", ""),
        server_cert=mtls.get("server_cert", ""),
        server_key=mtls.get("server_key", ""),
        allowed_subjects=tuple(subjects),
    )
    if mtls and not (config.ca_cert and config.server_cert and config.server_key):
        raise ConfigError("config key 'auth.mtls' needs ca_cert, server_cert and server_key")
    return config


def _build_seeds(seeds: Any) -> tuple[dict[str, Any], ...]:
    """The `[[instances]]` tables as they are: their fields are the create API's, checked
    by its serializer (system check instances.E004, and `manage.py seed_instances`)."""
    return _build_tables("instances", seeds)


def _build_tables(key: str, tables: Any) -> tuple[dict[str, Any], ...]:
    """An array of tables as it is (`[[models]]`: checked by the registry's serializer)."""
    if not isinstance(tables, list):
        raise ConfigError(f"config key '{key}' must be an array of tables ([[{key}]])")
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise ConfigError(f"config key '{key}[{index}]' must be a table")
    return tuple(tables)


def _check_ranges(config: Config) -> None:
    if config.instance_port_start > config.instance_port_end:
        raise ConfigError("config key 'instance_port_start' is above 'instance_port_end'")
    if config.prometheus_port_start > config.prometheus_port_end:
        raise ConfigError("config key 'prometheus_port_start' is above 'prometheus_port_end'")
