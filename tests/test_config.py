"""Configuration: defaults < TOML file < environment; a bad value stops start-up with a
message that names the key; `--config` works for every manage.py command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from manage import take_config_option
from teimanager.config import CONFIG_FILE_ENV, ConfigError, env_vars, keys, load_config
from tests.conftest import TEST_ENV
from tests.localtei_fixtures import free_port

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return str(path)


def test_it_has_defaults() -> None:
    config = load_config(env={})
    assert (config.api_port, config.grpc_port) == (9000, 9001)
    assert (config.instance_port_start, config.instance_port_end) == (8080, 8179)
    assert config.health_check_interval_secs == 5
    assert config.auto_restore_on_restart is True
    assert config.instances == ()


def test_it_lets_the_file_beat_defaults_and_the_environment_beat_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'api_port = 9100\nhealth_check_interval_secs = 7\ntei_binary_path = "/opt/tei"\n'
        "max_instances = 3\n"
        '[[instances]]\nname = "a"\nmodel_id = "m"\n',
    )
    from_file = load_config(path, env={})
    assert (from_file.api_port, from_file.health_check_interval_secs) == (9100, 7)
    assert from_file.max_instances == 3
    assert from_file.instances == ({"name": "a", "model_id": "m"},)
    env = {
        "TEI_MANAGER_API_PORT": "9200",
        "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "2",
        "TEI_BINARY_PATH": "/usr/bin/tei",
        "TEI_MANAGER_LOG_DIR": "/tmp/logs",
        "TEI_MANAGER_STATE_FILE": "/tmp/state.db",
        "TEI_MANAGER_GRPC_PORT": "9300",
        "TEI_MANAGER_GRPC_ENABLED": "false",
    }
    from_env = load_config(path, env=env)
    assert (from_env.api_port, from_env.health_check_interval_secs) == (9200, 2)
    assert (from_env.tei_binary_path, from_env.log_dir) == ("/usr/bin/tei", "/tmp/logs")
    assert (from_env.state_file, from_env.grpc_port, from_env.grpc_enabled) == (
        "/tmp/state.db",
        9300,
        False,
    )
    assert from_env.max_instances == 3  # not overridden: the file's value stays
    assert load_config(env={"TEI_MANAGER_CONFIG": path}).api_port == 9100


def test_it_reads_the_http_data_plane_and_admission_keys(tmp_path: Path) -> None:
    defaults = load_config(env={})
    assert (defaults.http_enabled, defaults.http_port) == (True, 9003)
    assert (defaults.max_client_batch_size, defaults.queue_size) == (2048, 1024)
    assert defaults.http_payload_limit_bytes == 2_000_000
    path = write(tmp_path, "http_port = 9103\nqueue_size = 8\nmax_client_batch_size = 64\n")
    env = {
        "TEI_MANAGER_HTTP_PORT": "9203",
        "TEI_MANAGER_HTTP_ENABLED": "false",
        "TEI_MANAGER_QUEUE_SIZE": "0",
        "TEI_MANAGER_HTTP_PAYLOAD_LIMIT": "1000",
    }
    config = load_config(path, env=env)
    assert (config.http_port, config.http_enabled, config.queue_size) == (9203, False, 0)
    assert (config.max_client_batch_size, config.http_payload_limit_bytes) == (64, 1000)


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        ('api_port = "abc"', {}, "api_port"),
        ("api_port = 70000", {}, "api_port"),
        ("", {"TEI_MANAGER_API_PORT": "nine"}, "api_port"),
        ("", {"TEI_MANAGER_HEALTH_CHECK_INTERVAL": "0"}, "health_check_interval_secs"),
        ("", {"TEI_MANAGER_GRPC_ENABLED": "maybe"}, "grpc_enabled"),
        ("max_instances = -1", {}, "max_instances"),
        ("grpc_request_timeout_secs = 0", {}, "grpc_request_timeout_secs"),
        ("auto_restore_on_restart = 3", {}, "auto_restore_on_restart"),
        ("", {"TEI_MANAGER_HTTP_PORT": "0"}, "http_port"),
        ("", {"TEI_MANAGER_QUEUE_SIZE": "-1"}, "queue_size"),
        ("max_client_batch_size = 0", {}, "max_client_batch_size"),
        ("", {"TEI_MANAGER_HTTP_PAYLOAD_LIMIT": "big"}, "http_payload_limit_bytes"),
        ("instance_port_start = 9000\ninstance_port_end = 8000", {}, "instance_port_start"),
        ("no_such_key = 1", {}, "no_such_key"),
        ("instances = 3", {}, "instances"),
        ("instances = [3]", {}, "instances[0]"),
        ("", {"TEI_MANAGER_INSTANCE_BIND": "localhost"}, "instance_bind"),
        ("instance_bind = '0.0.0.0:80'", {}, "instance_bind"),
        ("[auth.mtls]\nca_cert = 'x'", {}, "auth.mtls"),
        ("api_port = ", {}, "not valid TOML"),
        (
            "",
            {"TEI_MANAGER_MULTIPLEXER_METRICS_PORT": "abc"},
            "TEI_MANAGER_MULTIPLEXER_METRICS_PORT",
        ),
        ("", {"TEI_MANAGER_MULTIPLEXER_METRICS_PORT": "70000"}, "multiplexer_metrics_port"),
        ("", {"TEI_MANAGER_WEB_WORKERS": "0"}, "TEI_MANAGER_WEB_WORKERS"),
        ("", {"TEI_MANAGER_STOP_INSTANCES_ON_EXIT": "sometimes"}, "STOP_INSTANCES_ON_EXIT"),
        ("", {"DEBUG": "flase"}, "DEBUG"),
        ("", {"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ("", {"DATABASE_URL": "nonsense"}, "DATABASE_URL"),
        ("", {"CELERY_BROKER_URL": "localhost:6379"}, "CELERY_BROKER_URL"),
        ("debug = true", {}, "set DEBUG instead"),
        ("[auth.mtls]\nca_cert = 1\nserver_cert = 'a'\nserver_key = 'b'", {}, "auth.mtls.ca_cert"),
    ],
)
def test_it_names_the_key_of_a_bad_value(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), env=env)


def test_it_binds_instances_to_loopback_unless_told(tmp_path: Path) -> None:
    assert load_config(env={}).instance_bind == "127.0.0.1"
    path = write(tmp_path, "instance_bind = '10.0.0.5'\n")
    assert load_config(path, env={}).instance_bind == "10.0.0.5"
    env = {"TEI_MANAGER_INSTANCE_BIND": "::1"}
    assert load_config(path, env=env).instance_bind == "::1"


def test_it_stops_start_up_on_a_bad_seed_naming_its_key(tmp_path: Path) -> None:
    # A seed takes the create API's fields, checked by its serializer (instances.E004).
    path = write(
        tmp_path, '[[instances]]\nname = "a"\nmodel_id = "m"\nauto_truncate = "sometimes"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEI_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "--config", path, "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "instances.E004" in result.stderr
    assert "config key 'instances[0].auto_truncate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_it_refuses_a_missing_or_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), env={})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(str(tmp_path), env={})  # a directory


def test_it_takes_the_config_option_out_of_the_command_line() -> None:
    env: dict[str, str] = {}
    assert take_config_option(["manage.py", "--config", "a.toml", "check"], env) == [
        "manage.py",
        "check",
    ]
    assert env["TEI_MANAGER_CONFIG"] == "a.toml"
    assert take_config_option(["manage.py", "migrate", "--config=b.toml"], env) == [
        "manage.py",
        "migrate",
    ]
    assert env["TEI_MANAGER_CONFIG"] == "b.toml"


def test_it_stops_start_up_with_a_message_naming_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "graceful_shutdown_timeout_secs = 'soon'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEI_")}
    result = subprocess.run(
        [sys.executable, "manage.py", "--config", path, "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "graceful_shutdown_timeout_secs" in result.stderr
    assert "Traceback" not in result.stderr


def test_it_reads_every_variable_of_the_table() -> None:
    env = {
        "TEI_MANAGER_BIND": "0.0.0.0",
        "TEI_MANAGER_GRPC_HOST": "10.0.0.1",
        "TEI_MANAGER_MULTIPLEXER_METRICS_PORT": "0",
        "TEI_MANAGER_NODE": "gpu-1",
        "TEI_MANAGER_INSTANCE_HOST": "worker",
        "TEI_MANAGER_STOP_INSTANCES_ON_EXIT": "no",
        "ALLOWED_HOSTS": "a.example, b.example,",
        "DEBUG": "1",
        "LOG_LEVEL": "debug",
        "DATABASE_URL": "postgres://u:p@db/tei",
        "DJANGO_SUPERUSER_USERNAME": "boss",
    }
    config = load_config(env=env)
    assert (config.bind, config.grpc_host, config.multiplexer_metrics_port) == (
        "0.0.0.0",
        "10.0.0.1",
        0,
    )
    assert (config.node, config.instance_host, config.stop_instances_on_exit) == (
        "gpu-1",
        "worker",
        False,
    )
    assert config.allowed_hosts == ("a.example", "b.example")
    assert (config.debug, config.log_level, config.superuser_username) == (True, "debug", "boss")
    assert "postgres://u:p@db/tei" not in repr(config)  # secrets stay out of logs


def test_it_lists_every_setting_in_the_readme() -> None:
    """The README's configuration table: one row per setting, with its TOML key (when the
    file may set it), its variable and its default."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Configuration")
    section = readme[start : readme.index("\n## ", start)]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and not set(cells[0]) <= {"-"}:
            rows.append(cells)
    by_env = {env.strip("`"): cells for cells in rows for env in [cells[1]] if env}
    for key in keys():
        if not key.env:
            assert any(f"`{key.name}`" in cells[0] for cells in rows), key.name
            continue
        assert key.env in by_env, f"{key.env} is not in the README's configuration table"
        toml, _, default = by_env[key.env]
        assert (f"`{key.name}`" in toml) == key.in_file, f"{key.env}: TOML column"
        assert default, f"{key.env}: no default given"
    listed = set(by_env) - {"env"}
    assert listed <= set(env_vars()) | {CONFIG_FILE_ENV}, "a variable the code does not read"


def test_only_the_config_module_reads_the_environment() -> None:
    """`os.environ` / `os.getenv` outside teimanager/config.py: only to set Django's
    settings module, to pass --config on, or to hand an environment to a child process."""
    allowed = {
        "manage.py": ("setdefault", "take_config_option(sys.argv, os.environ)"),
        "teimanager/celery.py": ("setdefault",),
        "teimanager/wsgi.py": ("setdefault",),
        "teimanager/asgi.py": ("setdefault",),
        # The log pipe is the instance's parent: it reads the key it must redact from the
        # environment the manager gave the instance.
        "instances/logpipe.py": ('os.environ.get("API_KEY", "")',),
        "teimanager/probe.py": ("setdefault",),
        # A download's child gets the worker's environment, pointed at the configured hub.
        "registry/downloads.py": ("env = dict(os.environ)",),
        "instances/launch.py": (
            "os.environ.items() if passes(name)",
            'os.environ.get("PYTHONPATH")',
        ),
    }
    offenders = []
    files = [ROOT / "manage.py"]
    for package in ("teimanager", "instances", "registry", "multiplexer", "telemetry"):
        files += sorted((ROOT / package).rglob("*.py"))
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        if name == "teimanager/config.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            reads = "os.environ" in line or "os.getenv" in line or "environ.get(" in line
            if reads and not any(ok in line for ok in allowed.get(name, ())):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        (["manage.py", "check"], "DEBUG", "flase"),
        (["manage.py", "runmultiplexer"], "TEI_MANAGER_MULTIPLEXER_METRICS_PORT", "abc"),
        (["-m", "gunicorn", "teimanager.asgi", "--config", "python:teimanager.gunicorn_conf"],
         "TEI_MANAGER_WEB_WORKERS", "many"),
        (["-m", "celery", "-A", "teimanager", "worker"], "LOG_LEVEL", "LOUD"),
        (["-m", "celery", "-A", "teimanager", "beat"], "DATABASE_URL", "nonsense"),
    ],
)  # fmt: skip
def test_every_entry_point_stops_with_one_line_naming_the_variable(
    command: list[str], variable: str, value: str
) -> None:
    env = {**os.environ, **TEST_ENV, "TEI_MANAGER_API_PORT": str(free_port()), variable: value}
    try:
        result = subprocess.run(
            [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} started with {variable}={value!r}")
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("TEI Manager configuration error: ")
    assert variable in result.stderr and "Traceback" not in result.stderr
