"""The routing table: which instance serves a call, and whether it may go now.

The table is immutable and rebuilt from the database by the refresher thread; the hot path
only reads `Router.table` (one attribute load, atomic under the GIL) and never queries.
Replicas of one model are picked by least load (calls in flight plus queued), round-robin
among equals, so a slow replica gets less work and idle replicas take turns. Every call
then passes its instance's admission Gate (multiplexer/admission.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from time import time as _now
from types import MappingProxyType
from typing import TYPE_CHECKING

import grpc

from multiplexer.admission import AdmissionError, Gate
from multiplexer.wire import Target

if TYPE_CHECKING:
    from multiplexer.keys import KeyEntry
    from multiplexer.ondemand import ColdStarter

RUNNING = "running"


class RoutingError(AdmissionError):
    """A call cannot be routed; carries the gRPC status code the client gets."""


DEFAULT_MAX_CONCURRENT_REQUESTS = 512
DEFAULT_QUEUE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    model_id: str
    address: str
    status: str
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    pooling: str = ""
    auto_truncate: bool = True
    # The metadata that carries the instance's own key (`authorization: Bearer ...`).
    credentials: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    # Its node's worker stopped writing (nodes.Node): unreachable, whatever its status says.
    node_down: bool = False
    node: str = ""

    @property
    def running(self) -> bool:
        return self.status == RUNNING and not self.node_down

    @property
    def state(self) -> str:
        """Why it may not serve, in words: its status, or its node being down."""
        return f"unreachable, node '{self.node}' is down" if self.node_down else self.status


@dataclass(frozen=True)
class RoutingTable:
    by_name: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))
    by_model: Mapping[str, tuple[Route, ...]] = field(default_factory=lambda: MappingProxyType({}))
    running: tuple[Route, ...] = ()
    # Models started by the first call that finds none running (registry: on_demand).
    on_demand: frozenset[str] = frozenset()
    running_models: frozenset[str] = frozenset()

    @classmethod
    def build(cls, routes: Iterable[Route], on_demand: Iterable[str] = ()) -> RoutingTable:
        by_name = {route.name: route for route in sorted(routes, key=lambda r: r.name)}
        by_model: dict[str, list[Route]] = {}
        for route in by_name.values():
            by_model.setdefault(route.model_id, []).append(route)
        return cls(
            by_name=MappingProxyType(by_name),
            by_model=MappingProxyType({m: tuple(rs) for m, rs in by_model.items()}),
            running=tuple(route for route in by_name.values() if route.running),
            on_demand=frozenset(on_demand),
            running_models=frozenset(r.model_id for r in by_name.values() if r.running),
        )

    @property
    def addresses(self) -> frozenset[str]:
        return frozenset(route.address for route in self.by_name.values())

    def candidates(self, target: Target) -> tuple[Route, ...]:
        """The running instances that may serve `target`, or a RoutingError."""
        if target.instance_name is not None:
            return (self._by_instance_name(target.instance_name),)
        if target.model_id is not None:
            return self._by_model_id(target.model_id)
        if target.instance_index is not None:
            return (self._by_index(target.instance_index),)
        raise RoutingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "no target: set target.instance_name, target.model_id or target.instance_index",
        )

    def _by_instance_name(self, name: str) -> Route:
        if not name:
            raise RoutingError(grpc.StatusCode.INVALID_ARGUMENT, "target.instance_name is empty")
        route = self.by_name.get(name)
        if route is None:
            raise RoutingError(grpc.StatusCode.NOT_FOUND, f"instance '{name}' not found")
        if not route.running:
            raise RoutingError(
                grpc.StatusCode.UNAVAILABLE,
                f"instance '{name}' is not running (status: {route.state})",
            )
        return route

    def _by_model_id(self, model_id: str) -> tuple[Route, ...]:
        if not model_id:
            raise RoutingError(grpc.StatusCode.INVALID_ARGUMENT, "target.model_id is empty")
        routes = self.by_model.get(model_id, ())
        if not routes:
            raise RoutingError(grpc.StatusCode.NOT_FOUND, f"no instance serves model '{model_id}'")
        running = tuple(route for route in routes if route.running)
        if not running:
            states = ", ".join(f"{r.name}: {r.state}" for r in routes)
            raise RoutingError(
                grpc.StatusCode.UNAVAILABLE,
                f"no running instance serves model '{model_id}' ({states})",
            )
        return running

    def _by_index(self, index: int) -> Route:
        if index >= len(self.running):
            raise RoutingError(
                grpc.StatusCode.NOT_FOUND,
                f"instance index {index} is out of range: {len(self.running)} running",
            )
        return self.running[index]


class Router:
    """Holds the current table, spreads calls over replicas and admits them.

    `acquire`, `enter`, `release` and `retain` run on the server's event loop only;
    `update` may come from any thread (it swaps one reference).
    """

    def __init__(
        self,
        table: RoutingTable | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        processes: int = 1,
    ) -> None:
        """`processes`: how many multiplexer processes share the instances' limits and
        queues (`runmultiplexer --processes`); this one takes its share of each."""
        self.table = table or RoutingTable()
        self.processes = processes
        self.queue_size = -(-queue_size // processes)
        self.gates: dict[str, Gate] = {}
        self._turn = 0
        # Cold starts of on-demand models (multiplexer/ondemand.py); None: none.
        self.cold: ColdStarter | None = None
        # Instance name -> the time of its last call; the refresher writes them in batches.
        self.last_calls: dict[str, float] = {}

    def update(self, table: RoutingTable) -> None:
        self.table = table

    def needs_start(self, target: Target, grant: KeyEntry | None = None) -> bool:
        """Before routing: True when `target` is an on-demand model with no running
        instance, and the call's key (`grant`, None: any) may use that model (then
        `start`). Every warm call pays for this check only."""
        model_id = target.model_id
        if model_id is None or self.cold is None:
            return False
        table = self.table
        if model_id not in table.on_demand or model_id in table.running_models:
            return False
        return grant is None or grant.targets is None or bool(grant.targets.fullmatch(model_id))

    async def start(self, target: Target, timeout: float | None) -> None:
        """Have an instance of `target`'s model started and wait until it runs (within
        `timeout`; None: the cold starter's own limit)."""
        if self.cold is not None and target.model_id is not None:
            await self.cold.wait(target.model_id, timeout)

    async def acquire(
        self, target: Target, timeout: float | None, grant: KeyEntry | None = None
    ) -> Route:
        """Route `target` and take a slot on the chosen instance (queueing if need be)."""
        route = self.choose(target, grant)
        await self.enter(route, timeout)
        return route

    def choose(self, target: Target, grant: KeyEntry | None = None) -> Route:
        """The instance that serves `target` now, without taking a slot (a stream's);
        among those the call's key (`grant`, None: any) may use."""
        table = self.table
        candidates = table.candidates(target) if grant is None else grant.candidates(table, target)
        return candidates[0] if len(candidates) == 1 else self._least_loaded(candidates)

    async def enter(self, route: Route, timeout: float | None) -> None:
        """Take one slot on `route`'s instance: at once when free, else queued."""
        self.last_calls[route.name] = _now()
        gate = self.gates.get(route.name)
        if gate is None:  # a new table's limits reach existing gates through `retain`
            gate = self.gates[route.name] = Gate(route, self.queue_size, self.processes)
        if gate.in_flight < gate.limit and not gate.waiters:
            gate.in_flight += 1
            return
        await gate.enter(timeout)

    def release(self, route: Route) -> None:
        gate = self.gates.get(route.name)
        if gate is not None:
            gate.leave()

    def in_flight(self, name: str) -> int:
        gate = self.gates.get(name)
        return 0 if gate is None else gate.in_flight

    def retain(self, table: RoutingTable) -> None:
        """After a table change: adopt new limits, fail the queues of instances that left
        or stopped, and drop idle gates of instances that are gone."""
        for name, gate in list(self.gates.items()):
            route = table.by_name.get(name)
            if route is None or not route.running:
                state = "was deleted" if route is None else f"is {route.state}"
                gate.refuse_waiters(
                    RoutingError(grpc.StatusCode.UNAVAILABLE, f"instance '{name}' {state}")
                )
                if route is None and gate.in_flight == 0:
                    del self.gates[name]
            elif gate.route is not route:
                gate.update(route)

    def _least_loaded(self, candidates: tuple[Route, ...]) -> Route:
        self._turn += 1
        count = len(candidates)
        gates = self.gates
        best = candidates[self._turn % count]
        gate = gates.get(best.name)
        best_load = 0 if gate is None else gate.load
        for step in range(1, count):
            route = candidates[(self._turn + step) % count]
            gate = gates.get(route.name)
            load = 0 if gate is None else gate.load
            if load < best_load:
                best, best_load = route, load
        return best
