"""The verify task's work: start a throwaway instance of the model (the launch contract
of instances/launch.py, on free ports), wait for it to answer, ask Info, embed a probe
text, measure, stop it. Records dimensions, max input length, model type, the load time
(spawn to healthy) and the memory after load (the resident memory of its processes).
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import time
from pathlib import Path

import grpc
import psutil
from django.conf import settings
from django.utils import timezone

from instances import logs, process
from instances.launch import LaunchContractError, build_command, build_env
from instances.models import Instance
from registry.models import Model, ModelStatus

log = logging.getLogger(__name__)

PROBE_TEXT = "TEI Manager checks that this model loads and embeds."
MODEL_TYPES = {0: "embedding", 1: "classifier", 2: "reranker"}
LOG_NAME = "verify-{pk}"


def run(pk: int, token: str) -> None:
    model = Model.objects.filter(pk=pk, status=ModelStatus.LOADING, task_token=token).first()
    if model is None:
        return
    try:
        facts = measure(model)
    except CheckFailed as exc:
        model.transition(
            [ModelStatus.LOADING], ModelStatus.FAILED, same_task=True, last_error=str(exc)
        )
        log.warning("model %s: check failed: %s", model.model_id, exc)
        return
    if model.transition(
        [ModelStatus.LOADING],
        ModelStatus.VERIFIED,
        same_task=True,
        verified_at=timezone.now(),
        last_error="",
        **facts,
    ):
        log.info("model %s: verified (%s)", model.model_id, facts)


class CheckFailed(Exception):
    pass


def measure(model: Model) -> dict[str, object]:
    """Start, probe, measure and stop a throwaway instance; CheckFailed says why not."""
    instance = throwaway_instance(model)
    name = LOG_NAME.format(pk=model.pk)
    try:
        command = build_command(instance, settings.TEI.tei_binary_path, bind="127.0.0.1")
    except LaunchContractError as exc:
        raise CheckFailed(str(exc)) from None
    log_file = logs.log_path(settings.LOG_DIR, name)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with Path(log_file).open("ab") as out:
        child = subprocess.Popen(  # noqa: S603 - argv list, no shell
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=build_env(instance),
            start_new_session=True,
        )
    try:
        create_time = psutil.Process(child.pid).create_time()
    except psutil.Error:
        create_time = None
    try:
        load_time = _wait_healthy(instance, child.pid, create_time, started, name)
        facts = _probe(instance)
        facts.update(load_time_secs=round(load_time, 3), memory_bytes=_resident_bytes(child.pid))
        return facts
    finally:
        process.terminate(
            child.pid, create_time, float(settings.TEI.graceful_shutdown_timeout_secs)
        )


def throwaway_instance(model: Model) -> Instance:
    """An unsaved Instance row: what build_command and build_env read."""
    extra = ["--dtype", model.dtype] if model.dtype else []
    if model.revision:
        extra += ["--revision", model.revision]
    port = _free_port()
    return Instance(
        name=f"verify-{model.pk}",
        model_id=model.model_id,
        port=port,
        prometheus_port=_free_port(exclude=port),
        pooling=model.pooling,
        max_batch_tokens=model.max_batch_tokens,
        max_concurrent_requests=model.max_concurrent_requests,
        auto_truncate=model.auto_truncate,
        extra_args=extra,
        host="127.0.0.1",
        api_key=secrets.token_urlsafe(32),
    )


def _wait_healthy(
    instance: Instance, pid: int, create_time: float | None, started: float, name: str
) -> float:
    timeout = float(settings.TEI.startup_timeout_secs)
    while time.monotonic() - started < timeout:
        if not process.is_alive(pid, create_time):
            raise CheckFailed(f"the instance exited while loading: {_tail(name)}")
        if process.health_check(instance.address, 2.0, instance.api_key):
            return time.monotonic() - started
        time.sleep(0.2)
    raise CheckFailed(f"not healthy within startup_timeout_secs={int(timeout)}: {_tail(name)}")


def _probe(instance: Instance) -> dict[str, object]:
    from tei.v1 import tei_pb2, tei_pb2_grpc

    metadata = (("authorization", f"Bearer {instance.api_key}"),)
    with grpc.insecure_channel(instance.address) as channel:
        try:
            info = tei_pb2_grpc.InfoStub(channel).Info(
                tei_pb2.InfoRequest(), timeout=30, metadata=metadata
            )
            model_type = MODEL_TYPES.get(info.model_type, str(info.model_type))
            dimensions = None
            if model_type == "embedding":
                reply = tei_pb2_grpc.EmbedStub(channel).Embed(
                    tei_pb2.EmbedRequest(inputs=PROBE_TEXT, truncate=True),
                    timeout=60,
                    metadata=metadata,
                )
                if not reply.embeddings:
                    raise CheckFailed("the probe text got an empty embedding")
                dimensions = len(reply.embeddings)
            else:
                tei_pb2_grpc.PredictStub(channel).Predict(
                    tei_pb2.PredictRequest(inputs=PROBE_TEXT, truncate=True),
                    timeout=60,
                    metadata=metadata,
                )
        except grpc.RpcError as exc:
            raise CheckFailed(f"the probe failed: {exc.code().name}: {exc.details()}") from None
    return {
        "dimensions": dimensions,
        "max_input_length": info.max_input_length,
        "model_type": model_type,
    }


def _resident_bytes(pid: int) -> int | None:
    """The resident memory of the instance and its children, after load."""
    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
    except psutil.Error:
        return None


def _free_port(exclude: int = 0) -> int:
    import socket

    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != exclude:
            return port


def _tail(name: str) -> str:
    lines = [line for line in logs.tail(settings.LOG_DIR, name, 10) if not line.startswith("--- ")]
    return "\n".join(lines) or "(log is empty)"
