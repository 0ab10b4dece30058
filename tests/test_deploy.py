"""Production supervision files, checked against the code they run: docker/compose.yml
(one service per process, restart policies, liveness healthchecks, ports and environment
that agree with the configuration), docker/Dockerfile, and the systemd units in
deploy/systemd/. No container engine runs here: these tests read the files."""

from __future__ import annotations

import configparser
import json
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from teimanager.config import CONFIG_FILE_ENV, Config, env_vars, load_config
from teimanager.probe import PROBES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SYSTEMD = ROOT / "deploy" / "systemd"
APP_SERVICES = ("web", "worker", "beat", "multiplexer")
DEFAULTS = Config()
# Variables read by libraries, not by TEI Manager's configuration.
LIBRARY_VARS = {"PYTHONUNBUFFERED", "HF_HOME", "HF_HUB_OFFLINE", "PROMETHEUS_MULTIPROC_DIR"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def procfile() -> dict[str, list[str]]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {name: shlex.split(cmd) for name, _, cmd in (line.partition(": ") for line in lines)}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(part) for part in cmd]


def assert_same_process(wanted: list[str], argv: list[str]) -> None:
    """`argv` runs the Procfile's `wanted` command: the same program and arguments, every
    option with the same value (paths of files aside), maybe more options."""
    assert Path(argv[0]).name == wanted[0], argv
    want, got = parse_options(wanted[1:]), parse_options(argv[1:])
    assert got[0] == want[0], argv  # positional arguments
    for flag, value in want[1].items():
        assert flag in got[1], f"{argv}: no {flag}"
        if flag not in PATH_OPTIONS:
            assert got[1][flag] == value, f"{argv}: {flag}"


PATH_OPTIONS = {"--schedule"}


def parse_options(args: list[str]) -> tuple[list[str], dict[str, str]]:
    positional, options = [], {}
    it = iter(args)
    for arg in it:
        if arg.startswith("-"):
            options[arg] = next(it, "")
        else:
            positional.append(arg)
    return positional, options


def shell_text(service: dict[str, Any]) -> str:
    return " ".join(command(service))


def interpolate(value: Any) -> str:
    """Compose's `${VAR:-default}` with nothing set: the default; `$$` is a `$`."""
    text = re.sub(r"\$\{\w+:?-([^}]*)\}", r"\1", str(value))
    return re.sub(r"\$\{\w+\}", "", text).replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(value) for key, value in env.items()}


def dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(pair.split("=", 1) for pair in shlex.split(line[4:]))
    return env


def test_it_runs_every_process_as_its_own_service(services: dict[str, Any]) -> None:
    assert set(services) == {*APP_SERVICES, "redis", "postgres"}
    processes = procfile()
    assert set(processes) == set(APP_SERVICES)  # make run's processes, one service each
    for name in APP_SERVICES:
        argv = command(services[name])
        if argv[:2] == ["sh", "-c"]:  # web: set-up steps, then `exec` the process
            argv = shlex.split(argv[2].rsplit("exec ", 1)[1])
        assert_same_process(processes[name], argv)


def test_every_service_restarts_and_has_a_healthcheck(services: dict[str, Any]) -> None:
    for name, service in services.items():
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name
        check = service.get("healthcheck", {})
        assert check.get("test") and check.get("disable") is not True, name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries", "start_period"):
            assert key in check, f"{name}: healthcheck without {key}"


def test_each_healthcheck_asks_whether_that_process_lives(services: dict[str, Any]) -> None:
    tests = {name: " ".join(map(str, s["healthcheck"]["test"][1:])) for name, s in services.items()}
    # web: liveness, not /health (a 503 for another part must not mark web unhealthy).
    assert tests["web"] == "python -m teimanager.probe web"
    assert tests["multiplexer"] == "python -m teimanager.probe multiplexer"
    assert tests["beat"] == "python -m teimanager.probe beat"
    assert "celery -A teimanager inspect ping" in tests["worker"]
    hostname = command(services["worker"])[command(services["worker"]).index("--hostname") + 1]
    assert hostname == "worker@%h" and "--destination worker@$$HOSTNAME" in tests["worker"]
    assert tests["redis"] == "redis-cli ping"
    assert tests["postgres"].startswith("pg_isready")
    assert {"web", "multiplexer", "beat"} <= set(PROBES)  # tests/test_probe.py runs them


def test_it_publishes_the_configured_ports_on_loopback_only(services: dict[str, Any]) -> None:
    published = {name: s.get("ports", []) for name, s in services.items()}
    assert published["web"] == [f"127.0.0.1:{DEFAULTS.api_port}:{DEFAULTS.api_port}"]
    assert published["multiplexer"] == [
        f"127.0.0.1:{DEFAULTS.grpc_port}:{DEFAULTS.grpc_port}",
        f"127.0.0.1:{DEFAULTS.multiplexer_metrics_port}:{DEFAULTS.multiplexer_metrics_port}",
        f"127.0.0.1:{DEFAULTS.http_port}:{DEFAULTS.http_port}",
    ]
    for name in ("worker", "beat", "redis", "postgres"):
        assert not published[name], f"{name} publishes {published[name]}"


def test_every_app_service_has_a_valid_configuration(services: dict[str, Any]) -> None:
    image_env = dockerfile_env()
    known = set(env_vars()) | {CONFIG_FILE_ENV} | LIBRARY_VARS
    for name in APP_SERVICES:
        env = {**image_env, **environment(services[name])}
        assert set(env) <= known, f"{name}: unknown variables {set(env) - known}"
        env.pop(CONFIG_FILE_ENV)  # a path inside the image
        config = load_config(env=env)  # raises ConfigError on a bad value
        # Published ports need a listener on every interface of the container.
        assert config.bind == "0.0.0.0", name


def test_web_worker_and_multiplexer_agree_on_the_node_and_its_address(
    services: dict[str, Any],
) -> None:
    envs = {name: environment(services[name]) for name in APP_SERVICES}
    for key in ("TEI_MANAGER_NODE", "TEI_MANAGER_INSTANCE_HOST", "DATABASE_URL"):
        values = {name: env.get(key) for name, env in envs.items()}
        assert len(set(values.values())) == 1 and None not in values.values(), (key, values)
    # The multiplexer dials the host web records on each instance: the worker's name on
    # the compose network, where the worker's instances listen on every interface.
    assert envs["web"]["TEI_MANAGER_INSTANCE_HOST"] == "worker"
    assert "worker" in command(services["worker"])
    assert envs["worker"]["TEI_MANAGER_INSTANCE_BIND"] == "0.0.0.0"
    assert DEFAULTS.instance_bind == "127.0.0.1"  # elsewhere instances stay on loopback
    for name, service in services.items():
        assert "networks" not in service and "network_mode" not in service, name


def test_the_broker_and_database_urls_name_their_services(services: dict[str, Any]) -> None:
    env = environment(services["web"])
    broker = urlsplit(env["CELERY_BROKER_URL"])
    assert (broker.scheme, broker.hostname, broker.port) == ("redis", "redis", 6379)
    database = urlsplit(env["DATABASE_URL"])
    postgres = environment(services["postgres"])
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert database.username == postgres["POSTGRES_USER"]
    assert database.password == postgres["POSTGRES_PASSWORD"]
    assert database.path == "/" + postgres["POSTGRES_DB"]
    requirements = (ROOT / "requirements.txt").read_text()
    assert re.search(r"^psycopg\[binary\]==", requirements, re.M), "no PostgreSQL driver"


def test_the_others_start_after_web_has_migrated(services: dict[str, Any]) -> None:
    web = services["web"]
    assert "migrate --noinput" in shell_text(web)
    assert set(web["depends_on"]) == {"postgres", "redis"}
    for name in ("worker", "beat", "multiplexer"):
        depends = services[name]["depends_on"]
        assert set(depends) == {"postgres", "redis", "web"}, name
        assert all(d["condition"] == "service_healthy" for d in depends.values()), name


def test_volumes_share_logs_and_keep_state(compose: dict[str, Any]) -> None:
    services, image_env = compose["services"], dockerfile_env()

    def mounts(name: str) -> dict[str, str]:
        found = {}
        for volume in services[name].get("volumes", []):
            if isinstance(volume, str):
                source, target, *mode = volume.split(":")
                found[target] = source + (":" + mode[0] if mode else "")
            else:
                found[volume["target"]] = volume["type"]
        return found

    logs = image_env["TEI_MANAGER_LOG_DIR"]
    assert mounts("worker")[logs] == "instance-logs"  # the worker writes instance logs
    assert mounts("web")[logs] == "instance-logs:ro"  # the API reads them
    assert mounts("worker")[image_env["HF_HOME"]] == "hf-cache"
    assert mounts("web")[str(Path(image_env["TEI_MANAGER_STATE_FILE"]).parent)] == "state"
    assert mounts("postgres")["/var/lib/postgresql/data"] == "postgres-data"
    named = {m.split(":")[0] for n in services for m in mounts(n).values() if m != "tmpfs"}
    assert named == set(compose["volumes"])
    # The metrics directory stays inside one container (pids repeat across containers).
    for name in APP_SERVICES:
        directory = environment(services[name]).get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            assert mounts(name)[directory] == "tmpfs", name


def test_the_image_is_the_one_compose_builds(services: dict[str, Any]) -> None:
    for name in APP_SERVICES:
        build = services[name]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT and (context / build["dockerfile"]) == DOCKERFILE, name
    text = DOCKERFILE.read_text()
    exposed = {int(port) for port in re.findall(r"^EXPOSE (.+)$", text, re.M)[0].split()}
    assert exposed == {
        DEFAULTS.api_port,
        DEFAULTS.grpc_port,
        DEFAULTS.multiplexer_metrics_port,
        DEFAULTS.http_port,
    }
    known = set(env_vars()) | {CONFIG_FILE_ENV} | LIBRARY_VARS
    assert set(dockerfile_env()) <= known
    config_file = dockerfile_env()[CONFIG_FILE_ENV]
    assert (ROOT / config_file.removeprefix("/app/")).is_file()
    for copied in re.findall(r"^COPY (\S+) \./$", text, re.M):
        assert (ROOT / copied).exists(), copied
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*\])$", text.replace("\\\n", ""), re.M)
    assert healthcheck and json.loads(healthcheck.group(1)) == [
        "python", "-m", "teimanager.probe", "web"
    ]  # fmt: skip
    assert "honcho -f Procfile start" in text  # no command: the whole stack, like make run
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "var"} <= set(ignored)


def units() -> dict[str, configparser.ConfigParser]:
    found = {}
    for path in sorted(SYSTEMD.glob("tei-manager*.service")) + [SYSTEMD / "tei-manager.target"]:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        parser.read(path)
        found[path.name] = parser
    return found


def test_systemd_runs_one_unit_per_process_restarted_on_failure() -> None:
    found = units()
    processes = procfile()
    target = found.pop("tei-manager.target")
    assert set(found) == {f"tei-manager-{name}.service" for name in processes}
    assert set(target["Unit"]["Wants"].split()) == set(found)
    env_file = SYSTEMD / "tei-manager.env"
    for name, unit in found.items():
        service = unit["Service"]
        assert service["Restart"] == "on-failure", name
        assert service["EnvironmentFile"] == "/etc/tei-manager/tei-manager.env", name
        assert unit["Unit"]["PartOf"] == "tei-manager.target", name
        assert unit["Install"]["WantedBy"] == "tei-manager.target", name
        process = name.removeprefix("tei-manager-").removesuffix(".service")
        assert_same_process(processes[process], shlex.split(service["ExecStart"]))
    assert "migrate --noinput" in found["tei-manager-web.service"]["Service"]["ExecStartPre"]
    variables = {
        line.split("=", 1)[0].lstrip("# ")
        for line in env_file.read_text().splitlines()
        if re.match(r"^#? ?[A-Z_]+=", line)
    }
    assert variables <= set(env_vars()) | {CONFIG_FILE_ENV} | LIBRARY_VARS


WORKER_COMPOSE = ROOT / "docker" / "compose.worker.yml"
# What an operator gives a worker-only host (compose refuses to start without them).
WORKER_HOST_ENV = {
    "DATABASE_URL": "postgres://tei:secret@10.0.0.1:5432/tei",
    "CELERY_BROKER_URL": "redis://10.0.0.1:6379/0",
    "TEI_MANAGER_NODE": "gpu-2",
    "TEI_MANAGER_INSTANCE_HOST": "10.0.0.2",
    "TEI_MANAGER_INSTANCE_BIND": "10.0.0.2",
}


def test_a_worker_only_host_runs_the_same_worker_joined_to_a_remote_control_plane(
    services: dict[str, Any],
) -> None:
    compose = yaml.safe_load(WORKER_COMPOSE.read_text())
    (name,) = compose["services"]
    worker = compose["services"][name]
    main = services["worker"]
    assert_same_process(procfile()["worker"], command(worker))
    assert command(worker) == command(main)
    for key in ("build", "image", "restart", "healthcheck", "stop_grace_period"):
        assert worker[key] == main[key], key
    # Instances listen on the host's own address, at ports of its ranges.
    assert worker["network_mode"] == "host" and "ports" not in worker
    raw = worker["environment"]
    required = {key for key, value in raw.items() if re.fullmatch(r"\$\{\w+:\?[^}]+\}", value)}
    assert required == set(WORKER_HOST_ENV)
    env = {**dockerfile_env(), **environment(worker), **WORKER_HOST_ENV}
    env.pop(CONFIG_FILE_ENV)
    config = load_config(env=env)  # raises ConfigError on a bad value
    assert config.node == "gpu-2" and config.instance_host == "10.0.0.2"
    assert urlsplit(config.database_url).scheme.startswith("postgres")
    mounts = {volume.split(":")[1]: volume.split(":")[0] for volume in worker["volumes"]}
    assert mounts[dockerfile_env()["TEI_MANAGER_LOG_DIR"]] == "instance-logs"
    assert mounts[dockerfile_env()["HF_HOME"]] == "hf-cache"
    assert set(compose["volumes"]) == set(mounts.values())
