"""Two nodes on one machine, every part real: web, beat, a multiplexer, Redis, and two
workers with their own node names, port ranges and instance hosts (127.0.0.1 and
127.0.0.2), running localtei instances.

It checks placement across both nodes; routing by name and by model id across them; a
node whose worker dies: its failover instance moves (and serves from the other node), the
other stays and shows unreachable, nothing runs twice; and the node coming back: it stops
the process that moved away, restarts its own instance, and stops nothing else.

The database is PostgreSQL where one answers at POSTGRES_TEST_URL (`make test` sets it; a
database of the test's own, dropped after), else a SQLite file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from tests.conftest import SESSION_DIR
from tests.localtei_fixtures import MINILM_ID, prepare_onnx
from tests.stack import (
    CeleryWorker,
    Census,
    Service,
    Stack,
    localtei_processes,
    wait_until,
)

NODE_TIMEOUT = 10  # the shortest allowed: workers write their node's row every 5 s


class TwoNodes(Stack):
    """The Stack (node A: its worker, web, beat, multiplexer, Redis) plus node B's worker,
    whose instances listen on 127.0.0.2 and take ports from a range of their own."""

    def __init__(self, directory: Path, database_url: str = "") -> None:
        super().__init__(directory, "twonodes")
        self.database_url = database_url
        if database_url:
            self.env["DATABASE_URL"] = database_url
        self.env["TEI_MANAGER_NODE_TIMEOUT"] = str(NODE_TIMEOUT)  # every part reads this dict
        self.node_a, self.node_b = self.node, "twonodes-b"
        config_b = self.dir / "node-b.toml"
        base = self.port_base + 100
        config_b.write_text(
            "\n".join(
                line
                for line in (self.dir / "tei-manager.toml").read_text().splitlines()
                if not line.startswith(("instance_port", "prometheus_port"))
            )
            + f"\ninstance_port_start = {base}\ninstance_port_end = {base + 49}\n"
            f"prometheus_port_start = {base + 50}\nprometheus_port_end = {base + 99}\n"
        )
        self.env_b = {
            **self.env,
            "TEI_MANAGER_NODE": self.node_b,
            "TEI_MANAGER_CONFIG": str(config_b),
            "TEI_MANAGER_INSTANCE_HOST": "127.0.0.2",
            "TEI_MANAGER_INSTANCE_BIND": "127.0.0.2",
        }
        self.worker_b = self.new_worker_b()

    def new_worker_b(self) -> CeleryWorker:
        return CeleryWorker(self.node_b, self.env_b, self.dir / "services" / "worker-b.log")

    @property
    def services(self) -> list[Service]:
        return [*super().services, self.worker_b]

    def down(self) -> None:
        if self.worker_b.running():
            self.worker_b.stop()
        super().down()

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if not self.database_url:
            return super().query(sql, *args)
        import psycopg

        with psycopg.connect(self.database_url, autocommit=True) as db:
            cursor = db.execute(sql.replace("?", "%s"), args)
            return cursor.fetchall() if cursor.description else []

    def census(self) -> Census:
        """Both nodes' instance processes (B's ports follow A's)."""
        ports = range(self.port_base, self.port_base + 150)
        localtei = {port: pids for port, pids in localtei_processes().items() if port in ports}
        return Census(localtei, super().census().logpipes)

    def call(self, method: str, target: dict[str, str]) -> Any:
        """One Embed through the multiplexer; the reply, or the grpc.RpcError."""
        from tei.v1 import tei_pb2
        from tei_multiplexer.v1 import multiplexer_pb2, multiplexer_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}") as channel:
            stub = multiplexer_pb2_grpc.TeiMultiplexerStub(channel)
            try:
                return getattr(stub, method)(
                    multiplexer_pb2.EmbedRequest(
                        target=multiplexer_pb2.Target(**target),
                        request=tei_pb2.EmbedRequest(inputs="two nodes"),
                    ),
                    timeout=20,
                )
            except grpc.RpcError as exc:
                return exc


@pytest.fixture
def database_url() -> Iterator[str]:
    """A new PostgreSQL database where POSTGRES_TEST_URL answers, else "" (SQLite)."""
    server = os.environ.get("POSTGRES_TEST_URL", "").rsplit("/", 1)[0]
    try:
        import psycopg

        admin = psycopg.connect(f"{server}/postgres", autocommit=True, connect_timeout=2)
    except Exception:
        yield ""
        return
    name = f"test_teimanager_two_nodes_{uuid.uuid4().hex[:8]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield f"{server}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def two_nodes(database_url: str) -> Iterator[TwoNodes]:
    prepare_onnx(MINILM_ID)  # exported once for the session, before any start-up timeout
    stack = TwoNodes(SESSION_DIR / "two-nodes", database_url)
    try:
        stack.up()
        yield stack
    except BaseException:
        print(stack.tails())
        raise
    finally:
        stack.down()


def running(stack: TwoNodes, name: str, **expected: Any) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        row = stack.row(name)
        ok = row["status"] == "running" and all(row[k] == v for k, v in expected.items())
        return row if ok else None

    return wait_until(settled, 60, f"{name} running with {expected}")


def embed(stack: TwoNodes, **target: str) -> int:
    """Embed through the multiplexer (once its table has caught up): the vector's size."""

    def served() -> Any:
        reply = stack.call("Embed", target)
        return None if isinstance(reply, grpc.RpcError) else reply

    try:
        return len(wait_until(served, 5, f"an embedding from {target}").embeddings)
    except AssertionError:
        error = stack.call("Embed", target)
        raise AssertionError(f"{target}: {error.code()} {error.details()}") from None


def listens_on(port: int) -> tuple[str, int] | None:
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            return conn.laddr.ip.removeprefix("::ffff:"), conn.pid
    return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_two_nodes_place_route_fail_over_and_come_back(two_nodes: TwoNodes) -> None:
    stack = two_nodes
    a, b = stack.node_a, stack.node_b
    wait_until(
        lambda: (
            {n["name"]: n["status"] for n in stack.api("GET", "/nodes")[1]} == {a: "up", b: "up"}
        ),
        20,
        "both nodes up",
    )

    # Placement across both nodes: the fewest instances first, then by name (B sorts first).
    for name, failover in (("one", True), ("two", False), ("three", False)):
        status, body = stack.api("POST", "/instances", {"name": name, "model_id": MINILM_ID,
                                                         "failover": failover})  # fmt: skip
        assert status == 201, body
    one = running(stack, "one", node=b, host="127.0.0.2")
    two = running(stack, "two", node=a, host="127.0.0.1")
    three = running(stack, "three", node=b, host="127.0.0.2")
    assert listens_on(one["port"]) == ("127.0.0.2", one["pid"])
    assert listens_on(two["port"]) == ("127.0.0.1", two["pid"])
    assert one["port"] != two["port"] and one["port"] >= stack.port_base + 100

    # Routing by name and by model id, across both nodes.
    for name in ("one", "two", "three"):
        assert embed(stack, instance_name=name) == 384
    for _ in range(4):
        assert embed(stack, model_id=MINILM_ID) == 384

    # Node B's worker dies, and so does "three"; "one" keeps running, cut off from it.
    stack.worker_b.kill()
    os.killpg(three["pid"], signal.SIGKILL)
    wait_until(lambda: stack.api("GET", "/nodes/" + b)[1]["status"] == "down", 30, "B down")
    moved = running(stack, "one", node=a, host="127.0.0.1")
    assert moved["pid"] != one["pid"] and f"node '{b}' is down" in moved["last_error"]
    assert listens_on(moved["port"]) == ("127.0.0.1", moved["pid"])
    assert embed(stack, instance_name="one") == 384
    assert stack.row("three")["reachable"] is False
    refused = stack.call("Embed", {"instance_name": "three"})
    assert refused.code() == grpc.StatusCode.UNAVAILABLE and "is down" in refused.details()
    for _ in range(4):  # by model id: only the reachable replicas
        assert embed(stack, model_id=MINILM_ID) == 384
    # One tracked process per row on A; on B the one that moved away, until B is back.
    assert alive(one["pid"])
    orphans = stack.query("SELECT node, pid FROM instances_orphanprocess")
    assert orphans == [(b, one["pid"])]

    # B comes back: it stops what moved away, restarts "three", and stops nothing else.
    stack.worker_b = stack.new_worker_b()
    stack.worker_b.start()
    wait_until(lambda: not alive(one["pid"]), 30, "the process that moved away to stop")
    back = running(stack, "three", node=b, reachable=True)
    assert back["pid"] != three["pid"]
    wait_until(lambda: not stack.query("SELECT * FROM instances_orphanprocess"), 20, "no orphan")
    rows = {name: stack.row(name) for name in ("one", "two", "three")}
    assert (rows["one"]["pid"], rows["two"]["pid"]) == (moved["pid"], two["pid"])
    census = stack.census().localtei
    assert {port: pids for port, pids in census.items() if pids} == {
        row["port"]: {row["pid"]} for row in rows.values()
    }
    assert embed(stack, instance_name="three") == 384
    with contextlib.suppress(Exception):
        stack.api("DELETE", "/instances/one")
