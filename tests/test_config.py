"""Configuration: defaults < TOML file < environment; a bad value stops start-up with a
message that names the key; `--config` works for every manage.py command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from manage import take_config_option
from teimanager.config import ConfigError, load_config

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
        ('[[instances]]\nname = "a"', {}, "instances[0].model_id"),
        ('[[instances]]\nname = "a"\nmodel_id = "m"\ncolour = "red"', {}, "instances[0].colour"),
        ("[auth.mtls]\nca_cert = 'x'", {}, "auth.mtls"),
        ("api_port = ", {}, "not valid TOML"),
    ],
)
def test_it_names_the_key_of_a_bad_value(
    tmp_path: Path, text: str, env: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(write(tmp_path, text), env=env)


def test_it_refuses_a_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.toml"), env={})


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
