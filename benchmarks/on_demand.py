"""On-demand benchmark: writes benchmarks/results/on_demand.md.

1. Time to first answer, in the same run, same model (all-MiniLM-L6-v2 on localtei):
   a cold on-demand call (a gRPC Embed by model id that finds no instance: the
   multiplexer asks the control plane, a real Celery worker launches it, the call waits
   and goes through) against the manual path (create through the lifecycle service, poll
   until `running`, then the first call by instance name). Three rounds each, alternating,
   after a start that is not counted (localtei's one-time ONNX export of the model).
2. What the on-demand machinery adds to a warm call: the routing step (`Router.choose`
   over a table of 100 instances, a model-id target) with and without the on-demand check
   (`Router.needs_start`) and the last-call stamp `Router.enter` writes. Goal ≤ 50 µs.

It runs on its own SQLite file, Redis DB 14 and queue names, next to anything else.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
WORK = Path(tempfile.mkdtemp(prefix="teimanager-bench-"))
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ENV = {
    "DJANGO_SETTINGS_MODULE": "teimanager.settings",
    "TEI_MANAGER_CONFIG": "",
    "TEI_MANAGER_STATE_FILE": str(WORK / "state.sqlite3"),
    "TEI_MANAGER_LOG_DIR": str(WORK / "logs"),
    "TEI_MANAGER_NODE": f"bench-{RUN_ID}",
    "TEI_MANAGER_HEALTH_CHECK_INTERVAL": "1",
    "TEI_BINARY_PATH": "",
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/14",
    "CELERY_TASK_DEFAULT_QUEUE": f"bench-{RUN_ID}",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TEI_MANAGER_HTTP_ENABLED": "false",
    "LOCALTEI_CACHE": str(WORK / "localtei-cache"),
}
os.environ.update(ENV)
sys.path[:0] = [str(ROOT), str(ROOT / "proto")]

import django  # noqa: E402
import redis  # noqa: E402

django.setup()

import grpc  # noqa: E402
from django.core.management import call_command  # noqa: E402
from tei.v1 import tei_pb2  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2 as mux  # noqa: E402
from tei_multiplexer.v1 import multiplexer_pb2_grpc  # noqa: E402

from instances import process, services  # noqa: E402
from instances.models import Instance, Status  # noqa: E402
from multiplexer.routing import Route, Router, RoutingTable  # noqa: E402
from multiplexer.server import BackgroundMultiplexer, ServerOptions  # noqa: E402
from multiplexer.wire import Target  # noqa: E402
from registry.models import Model  # noqa: E402

ROUNDS = 3
WARM_GOAL_SECS = 50e-6


def main() -> None:
    try:
        run()
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
        client = redis.Redis.from_url(ENV["CELERY_BROKER_URL"])
        for key in client.scan_iter(f"*{RUN_ID}*"):
            client.delete(key)


def run() -> None:
    call_command("migrate", verbosity=0)
    routing = routing_step()
    cold, manual = first_answers()
    added = routing["with"] - routing["without"]
    cold_p50, manual_p50 = statistics.median(cold), statistics.median(manual)
    rows = [
        ("cold on-demand call → first answer (median)", f"{cold_p50:.2f} s", "–", True),
        ("create + start + first call → first answer (median)", f"{manual_p50:.2f} s", "–",
         True),
        ("routing step, 100 instances, without the on-demand check",
         f"{routing['without'] * 1e9:.0f} ns", "–", True),
        ("routing step, with the on-demand check and last-call stamp",
         f"{routing['with'] * 1e9:.0f} ns", "–", True),
        ("added to a warm call", f"{added * 1e6:.3f} µs", "≤ 50 µs", added <= WARM_GOAL_SECS),
    ]  # fmt: skip
    report = "\n".join(
        [
            "# On-demand benchmark",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
            f"SQLite (WAL), Redis broker, one prefork Celery worker, the multiplexer in "
            f"process; model {MODEL} on localtei. Command: `python benchmarks/on_demand.py`.",
            "",
            "| measure | result | goal | met |",
            "|---|---|---|---|",
            *[f"| {n} | {v} | {g} | {'yes' if ok else 'NO'} |" for n, v, g, ok in rows],
            "",
            f"Rounds (cold on-demand / manual), seconds: "
            f"{', '.join(f'{c:.2f} / {m:.2f}' for c, m in zip(cold, manual, strict=True))}. "
            "Both paths pay for the worker's launch and localtei's model load, and both "
            "see the row turn `running` through the worker's start watch. The cold call "
            "then reloads the routing table itself (every 0.1 s while it waits); the "
            "manual path waits for the refresher's next reload (every 0.5 s), as a client "
            "that creates an instance and then calls it does.",
            "",
            "The warm-call figure is the routing step alone (`Router.needs_start` + "
            "`Router.choose`, plus the last-call stamp `Router.enter` writes), each the "
            "best of 5 runs of 200,000 calls; a warm call's whole hop through the "
            "multiplexer is in multiplexer_overhead.md.",
            "",
        ]
    )
    out = ROOT / "benchmarks" / "results" / "on_demand.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)


def routing_step() -> dict[str, float]:
    routes = [
        Route(name=f"i-{i:03d}", model_id=f"org/m-{i % 50}", address=f"127.0.0.1:{20000 + i}",
              status="running")
        for i in range(100)
    ]  # fmt: skip
    table = RoutingTable.build(routes, on_demand=[f"org/m-{i}" for i in range(50)])
    router = Router(table)
    router.cold = object()  # type: ignore[assignment]  # only its presence is read
    target = Target(model_id="org/m-7")
    stamps = router.last_calls
    from time import time as now

    def without() -> None:
        router.choose(target)

    def with_on_demand() -> None:
        if router.needs_start(target):
            raise AssertionError("a warm model needs no start")
        route = router.choose(target)
        stamps[route.name] = now()

    number = 200_000
    best = {
        "without": min(timeit.repeat(without, number=number, repeat=5)) / number,
        "with": min(timeit.repeat(with_on_demand, number=number, repeat=5)) / number,
    }
    return best


def first_answers() -> tuple[list[float], list[float]]:
    log = open(WORK / "worker.log", "wb")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "teimanager", "worker", "-B", "--schedule",
         str(WORK / "beat"), "--pool", "prefork", "--concurrency", "2", "--without-mingle",
         "--without-gossip", "--without-heartbeat", "--loglevel", "INFO"],
        cwd=ROOT, env={**os.environ}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    options = ServerOptions(host="127.0.0.1", port=0, on_demand_wait_secs=300)
    try:
        deadline = time.monotonic() + 60
        while b" ready." not in (WORK / "worker.log").read_bytes():
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError((WORK / "worker.log").read_text())
            time.sleep(0.1)
        Model.objects.update_or_create(model_id=MODEL, defaults={"on_demand": True})
        with BackgroundMultiplexer(options) as background:
            assert background.server is not None
            router = background.server.router
            while MODEL not in router.table.on_demand:
                time.sleep(0.05)
            channel = grpc.insecure_channel(f"127.0.0.1:{background.server.port}")
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            manual_start(stub, router, "warm-up")  # the ONNX export, once, in neither figure
            cold, manual = [], []
            for round_ in range(ROUNDS):
                cold.append(cold_call(stub, router))
                manual.append(manual_start(stub, router, f"manual-{round_}"))
            channel.close()
        return cold, manual
    finally:
        os.killpg(worker.pid, 15)
        worker.wait(30)
        for instance in Instance.objects.exclude(pid=None):
            process.terminate(instance.pid, instance.process_started_at, 5)
        Instance.objects.all().delete()


def embed(stub: multiplexer_pb2_grpc.TeiMultiplexerStub, target: mux.Target) -> None:
    request = mux.EmbedRequest(target=target, request=tei_pb2.EmbedRequest(inputs="first"))
    assert len(stub.Embed(request, timeout=300).embeddings) == 384


def cold_call(stub: multiplexer_pb2_grpc.TeiMultiplexerStub, router: Router) -> float:
    started = time.perf_counter()
    embed(stub, mux.Target(model_id=MODEL))
    elapsed = time.perf_counter() - started
    remove_all(router)
    return elapsed


def manual_start(stub: multiplexer_pb2_grpc.TeiMultiplexerStub, router: Router, name: str) -> float:
    started = time.perf_counter()
    services.create_instance(name=name, model_id=MODEL)
    while (status := Instance.objects.get(name=name).status) != Status.RUNNING:
        if status == Status.FAILED:
            raise RuntimeError(Instance.objects.get(name=name).last_error)
        time.sleep(0.02)
    while name not in router.table.by_name or not router.table.by_name[name].running:
        time.sleep(0.02)
    embed(stub, mux.Target(instance_name=name))
    elapsed = time.perf_counter() - started
    remove_all(router)
    return elapsed


def remove_all(router: Router) -> None:
    for instance in Instance.objects.all():
        services.delete_instance(instance.name)
        if instance.pid:
            while process.is_alive(instance.pid, instance.process_started_at):
                time.sleep(0.05)
    while router.table.by_name:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
