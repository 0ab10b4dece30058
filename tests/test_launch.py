"""The launch contract: the managed flags (written from the row, refused in extra_args in
every spelling), the bind address, and an environment that names no TEI flag."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from tei.v1 import tei_pb2, tei_pb2_grpc

from instances import launch, process, services, supervisor
from instances.launch import FLAG_ENV_NAMES, MANAGED_FLAGS, refuse_managed_flags
from instances.models import DesiredState, Instance, Status
from tests.conftest import SESSION_ID, wait_for_status
from tests.localtei_fixtures import MINILM_ID


def make_instance(**fields: object) -> Instance:
    values: dict[str, object] = {"name": "p", "model_id": "org/model", "port": 8080}
    values |= {"prometheus_port": 9100, **fields}
    return Instance(**values)


def test_it_builds_the_launch_contract() -> None:
    row = make_instance(pooling="splade", extra_args=["--dtype", "float16"])
    command = launch.build_command(row, "", bind="10.1.2.3")
    assert command[:3] == [sys.executable, "-m", "localtei"]
    assert command[3:] == [
        "--model-id", "org/model", "--hostname", "10.1.2.3", "--port", "8080",
        "--max-batch-tokens", "16384", "--max-concurrent-requests", "512", "--json-output",
        "--prometheus-port", "9100", "--pooling", "splade", "--auto-truncate",
        "--dtype", "float16",
    ]  # fmt: skip
    plain = launch.build_command(make_instance(auto_truncate=False), "")
    assert "--pooling" not in plain and "--auto-truncate" not in plain
    assert plain[plain.index("--hostname") + 1] == "127.0.0.1"  # TEI_MANAGER_INSTANCE_BIND


def test_it_uses_tei_binary_path_only_when_it_is_executable(tmp_path: Path) -> None:
    router = tmp_path / "text-embeddings-router"
    router.write_text("#!/bin/sh\n")
    assert launch.binary_command(str(router))[0] == sys.executable
    router.chmod(0o755)
    assert launch.binary_command(str(router)) == [str(router)]
    assert launch.binary_command("")[1:] == ["-m", "localtei"]


def test_it_refuses_every_flag_it_writes() -> None:
    row = make_instance(pooling="mean", auto_truncate=True)
    written = [arg for arg in launch.build_command(row, "")[3:] if arg.startswith("-")]
    assert len(written) == sum(1 for flag in MANAGED_FLAGS if flag.value(row, "127.0.0.1"))
    for flag in written:
        assert refuse_managed_flags([flag]) is not None, flag
        assert refuse_managed_flags([f"{flag}=x"]) is not None, flag


@pytest.mark.parametrize(
    ("extra_args", "named"),
    [
        (["-p", "19150"], "-p"),
        (["-p19150"], "-p"),
        (["-p=19150"], "-p"),
        (["--port=19150"], "--port"),
        (["--auto-truncate"], "--auto-truncate"),
        (["--auto-truncate=false"], "--auto-truncate"),
        (["--api-key", "k"], "--api-key"),
        (["--api-key=k"], "--api-key"),
        (["--hostname", "0.0.0.0"], "--hostname"),
        (["--hostname=0.0.0.0"], "--hostname"),
        (["--device-id", "1"], "--device-id"),
        (["--dtype", "float16", "--pooling", "cls"], "--pooling"),
        (["--json-output"], "--json-output"),
        (["--prometheus-port", "9000"], "--prometheus-port"),
        (["--max-batch-tokens=1"], "--max-batch-tokens"),
        (["--max-concurrent-requests", "1"], "--max-concurrent-requests"),
        (["--model-id", "other/model"], "--model-id"),
    ],
)
@pytest.mark.django_db
def test_the_api_refuses_managed_flags_in_extra_args(
    api: Any, extra_args: list[str], named: str
) -> None:
    response = api.post(
        "/instances",
        {"name": "x", "model_id": "org/model", "extra_args": extra_args},
        format="json",
    )
    assert response.status_code == 400, response.json()
    body = response.json()
    assert body["code"] == "VALIDATION_ERROR"
    assert body["error"].startswith(f"extra_args: {named} is set by the manager"), body
    assert not Instance.objects.exists()


@pytest.mark.django_db
def test_the_api_takes_the_flags_it_does_not_manage(api: Any) -> None:
    extra = [
        "--dtype",
        "float32",
        "--max-batch-requests=8",
        "--revision",
        "main",
        "--payload-limit",
        "1",
    ]
    response = api.post(
        "/instances", {"name": "x", "model_id": "org/model", "extra_args": extra}, format="json"
    )
    assert response.status_code == 201, response.json()
    assert Instance.objects.get(name="x").extra_args == extra


@pytest.mark.django_db
def test_a_row_with_a_managed_flag_fails_its_launch_naming_it(settings: Any) -> None:
    # Written before extra_args were checked this way: it must not start on another port.
    row = Instance.objects.create(
        name="legacy",
        model_id="org/model",
        port=8080,
        prometheus_port=9100,
        extra_args=["-p", "19150"],
        node=settings.NODE_NAME,
        status=Status.PENDING,
        desired_state=DesiredState.RUNNING,
    )
    supervisor.launch(row.pk)
    row.refresh_from_db()
    assert (row.status, row.pid) == (Status.FAILED, None)
    assert row.last_error == "extra_args: -p is set by the manager (the port field)"


def test_the_environment_names_no_tei_flag_and_keeps_what_a_server_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stray = {
        **{name: "stray" for name in FLAG_ENV_NAMES},
        "SECRET_KEY": "the manager's",
        "DJANGO_SUPERUSER_PASSWORD": "the manager's",
        "DATABASE_URL": "postgres://user:secret@db/tei",
        "PROMETHEUS_MULTIPROC_DIR": "/the/managers/metrics",
    }
    needed = {
        "PATH": "/usr/bin",
        "HOME": "/home/tei",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "LD_LIBRARY_PATH": "/usr/local/cuda/lib64",
        "HF_HOME": "/data/hf",
        "HF_HUB_OFFLINE": "1",
        "HUGGINGFACE_HUB_CACHE": "/data/hf/hub",
        "TRANSFORMERS_OFFLINE": "1",
        "https_proxy": "http://proxy:3128",
        "NO_PROXY": "localhost",
        "SSL_CERT_FILE": "/etc/ssl/certs/ca.pem",
        "LOCALTEI_NUM_THREADS": "1",
    }
    for name, value in {**stray, **needed}.items():
        monkeypatch.setenv(name, value)
    env = launch.build_env(make_instance(gpu_id=3, auto_truncate=True))
    for name, value in needed.items():
        assert env[name] == value, name
    assert env["CUDA_VISIBLE_DEVICES"] == "3"
    assert env["PYTHONPATH"].split(":")[:2] == [
        str(launch.BASE_DIR),
        str(launch.BASE_DIR / "proto"),
    ]
    leaked = set(stray) & set(env)
    # HF_TOKEN & co. are the hub's own settings; every other flag variable stays out.
    assert leaked == {"HF_TOKEN", "HF_API_TOKEN", "HUGGINGFACE_HUB_CACHE"}, leaked
    # What the manager sets on purpose: auto_truncate off says so in every router version.
    assert launch.build_env(make_instance(auto_truncate=False))["AUTO_TRUNCATE"] == "false"
    # The instance's own key, never the manager's API_KEY (nor one on the command line).
    keyed = make_instance(api_key="the-instance-key")
    assert launch.build_env(keyed)["API_KEY"] == "the-instance-key"
    assert "the-instance-key" not in " ".join(launch.build_command(keyed, ""))


@pytest.mark.django_db
def test_a_failed_start_explains_itself_without_the_hosts_paths(
    settings: Any, tmp_path: Path
) -> None:
    settings.LOG_DIR = tmp_path
    # A local directory that holds no model, relative to the instances' working directory.
    row = make_instance(name="nomodel", model_id="tests")
    spawned = process.spawn(row, "", tmp_path)
    deadline = time.monotonic() + 60
    while process.is_alive(spawned.pid, spawned.create_time):
        assert time.monotonic() < deadline, "localtei did not give up"
        process.reap_children()
        time.sleep(0.1)
    last_error = supervisor._log_tail(row)  # what the row's last_error and the API show
    assert "model 'tests' is not loadable: no readable config.json" in last_error
    assert str(launch.BASE_DIR) not in last_error


def test_a_port_held_on_one_address_only_is_not_free() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.2", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not process.port_is_free(port)
    assert process.port_is_free(port)


@pytest.mark.django_db(transaction=True)
def test_an_instance_runs_as_its_row_says_whatever_the_workers_environment_holds(
    start_worker: Any, settings: Any
) -> None:
    node = f"env-{SESSION_ID}"
    settings.NODE_NAME = node
    settings.INSTANCE_HOST = "127.0.0.2"  # where the multiplexer and health checks dial
    start_worker(
        node,
        TEI_MANAGER_INSTANCE_BIND="127.0.0.2",
        # What a container or a careless shell may hold; each names a router flag.
        PORT="1",
        HOSTNAME="203.0.113.9",
        MODEL_ID="nobody/wrong-model",
        POOLING="splade",
        API_KEY="leaked",
        AUTO_TRUNCATE="true",
        MAX_BATCH_TOKENS="7",
    )
    services.create_instance(name="clean", model_id=MINILM_ID, auto_truncate=False)
    row = wait_for_status("clean", Status.RUNNING, Status.FAILED, timeout=180)
    assert row.status == Status.RUNNING, row.last_error

    server = psutil.Process(row.pid)
    listening = {
        (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port)  # gRPC's IPv4-mapped socket
        for c in server.net_connections("tcp6") + server.net_connections("tcp4")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {("127.0.0.2", row.port), ("127.0.0.2", row.prometheus_port)}
    env = server.environ()
    assert {name for name in env if name in FLAG_ENV_NAMES} == {"AUTO_TRUNCATE", "API_KEY"}
    assert env["AUTO_TRUNCATE"] == "false"
    # Its own key, not the worker's: in the environment, never on the command line.
    assert len(row.api_key) >= 32 and env["API_KEY"] == row.api_key
    assert not any(row.api_key in arg for arg in server.cmdline())

    key = (("authorization", f"Bearer {row.api_key}"),)
    with grpc.insecure_channel(f"127.0.0.2:{row.port}") as channel:
        info = tei_pb2_grpc.InfoStub(channel).Info(tei_pb2.InfoRequest(), timeout=10, metadata=key)
        assert (info.model_id, info.max_batch_tokens) == (MINILM_ID, 16384)
        embed = tei_pb2_grpc.EmbedStub(channel)
        hello = tei_pb2.EmbedRequest(inputs="hello")
        assert len(embed.Embed(hello, timeout=30, metadata=key).embeddings) == 384
        for wrong in (None, (("authorization", "Bearer leaked"),)):
            with pytest.raises(grpc.RpcError) as refused:  # the port is no back door
                embed.Embed(hello, timeout=30, metadata=wrong)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as too_long:  # auto_truncate is off, as the row says
            embed.Embed(tei_pb2.EmbedRequest(inputs="word " * 1000), timeout=30, metadata=key)
        assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
