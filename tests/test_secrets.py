"""No secret leaks: after a run that creates, restarts and calls an instance behind keys,
neither its own key nor any API key appears in a log (the instance's, the worker's, this
process's) or in what the API, the admin or the data plane answered.

The stand-in router (tests/fake_tei.py) prints its key at start, as text-embeddings-router
does: the log pipe must write it as `[redacted]`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from django.test import Client
from rest_framework.test import APIClient
from tei_multiplexer.v1 import multiplexer_pb2 as mux
from tei_multiplexer.v1 import multiplexer_pb2_grpc

from access import keys
from instances.logpipe import REDACTED, RotatingLog
from instances.models import Instance, Status
from multiplexer.server import BackgroundMultiplexer, ServerOptions
from tests.conftest import SESSION_DIR, TEST_LOG_DIR, Worker, wait_for_new_process, wait_for_status
from tests.http_client import request

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def multiplexer() -> Iterator[BackgroundMultiplexer]:
    options = ServerOptions(host="127.0.0.1", port=0, http_port=0, refresh_interval_secs=0.2)
    with BackgroundMultiplexer(options) as background:
        yield background


def test_the_log_pipe_writes_the_instance_key_as_redacted(tmp_path: Any) -> None:
    log = RotatingLog(str(tmp_path / "x.log"), 0, 0, secret=b"s3cret-key")
    log.write(b'Args { api_key: Some("s3cret-key") }\nno key here\n')
    assert (tmp_path / "x.log").read_bytes() == (
        b'Args { api_key: Some("' + REDACTED + b'") }\nno key here\n'
    )


def test_no_secret_reaches_a_log_or_an_answer(
    fake_worker: Worker,
    multiplexer: BackgroundMultiplexer,
    admin_client: Client,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    admin = keys.create_key("ops", ["admin"]).secret
    inference = keys.create_key("app", ["inference"], rate_per_sec=100).secret
    api = APIClient(HTTP_AUTHORIZATION=f"Bearer {admin}")
    answers: list[str] = []

    def keep(response: Any) -> Any:
        answers.append(response.content.decode(errors="replace"))
        return response

    assert keep(api.post("/instances", {"name": "quiet", "model_id": "fake/model"}, format="json"))
    row = wait_for_status("quiet", Status.RUNNING, Status.FAILED, timeout=60)
    assert row.status == Status.RUNNING, row.last_error
    keep(api.post("/instances/quiet/restart"))
    wait_for_new_process("quiet", row.pid, 60, "quiet to run again after its restart")
    instance_key = Instance.objects.get(name="quiet").api_key

    for path in ("/instances", "/instances/quiet", "/instances/quiet/logs", "/metrics"):
        keep(api.get(path))
    keep(api.get("/instances/quiet/events"))
    keep(APIClient().get("/instances", HTTP_AUTHORIZATION=f"Bearer {admin}x"))  # refused
    for page in ("/admin/instances/instance/", f"/admin/instances/instance/{row.pk}/change/",
                 "/admin/access/apikey/", "/admin/access/auditevent/"):  # fmt: skip
        keep(admin_client.get(page))

    server = multiplexer.server
    assert server is not None
    info = mux.InfoRequest(target=mux.Target(instance_name="quiet"))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
        for presented in (inference, f"{inference}x", admin):  # the stand-in has no Info
            with pytest.raises(grpc.RpcError) as failed:
                stub.Info(info, metadata=(("authorization", f"Bearer {presented}"),), timeout=10)
            answers.append(failed.value.details() or "")  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{server.http_port}"
    for key in (inference, f"{inference}x"):
        reply = request(f"{base}/instances/quiet/info", headers={"Authorization": f"Bearer {key}"})
        answers.append(reply.raw.decode(errors="replace"))

    logs = [path.read_text(errors="replace") for path in TEST_LOG_DIR.glob("quiet.log*")]
    assert logs and any(REDACTED.decode() in text for text in logs)  # it had a key to hide
    logs += [path.read_text(errors="replace") for path in SESSION_DIR.glob("worker-*.log")]
    logs.append(caplog.text)
    secrets = {
        "the instance's key": instance_key,
        "the admin key": admin,
        "the admin key's secret": admin.split(".")[1],
        "the inference key": inference,
        "the inference key's secret": inference.split(".")[1],
    }
    for name, secret in secrets.items():
        assert len(secret) >= 32, name
        for text in logs:
            assert secret not in text, f"{name} is in a log"
        for text in answers:
            assert secret not in text, f"{name} is in an answer"
