"""The routing table: which instance serves a call.

The table is immutable and rebuilt from the database by the refresher thread; the hot path
only reads `Router.table` (one attribute load, atomic under the GIL) and never queries.
Replicas of one model are picked by least in flight, round-robin among equals, so a slow
replica gets less work and idle replicas take turns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import grpc

from multiplexer.wire import Target

RUNNING = "running"


class RoutingError(Exception):
    """A call cannot be routed; carries the gRPC status code the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    model_id: str
    address: str
    status: str

    @property
    def running(self) -> bool:
        return self.status == RUNNING


@dataclass(frozen=True)
class RoutingTable:
    by_name: Mapping[str, Route] = field(default_factory=lambda: MappingProxyType({}))
    by_model: Mapping[str, tuple[Route, ...]] = field(default_factory=lambda: MappingProxyType({}))
    running: tuple[Route, ...] = ()

    @classmethod
    def build(cls, routes: Iterable[Route]) -> RoutingTable:
        by_name = {route.name: route for route in sorted(routes, key=lambda r: r.name)}
        by_model: dict[str, list[Route]] = {}
        for route in by_name.values():
            by_model.setdefault(route.model_id, []).append(route)
        return cls(
            by_name=MappingProxyType(by_name),
            by_model=MappingProxyType({m: tuple(rs) for m, rs in by_model.items()}),
            running=tuple(route for route in by_name.values() if route.running),
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
                f"instance '{name}' is not running (status: {route.status})",
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
            states = ", ".join(f"{r.name}: {r.status}" for r in routes)
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
    """Holds the current table and spreads calls over replicas.

    `pick` and `release` run on the server's event loop only; `update` may come from any
    thread (it swaps one reference).
    """

    def __init__(self, table: RoutingTable | None = None) -> None:
        self.table = table or RoutingTable()
        self.in_flight: dict[str, int] = {}
        self._turn = 0

    def update(self, table: RoutingTable) -> None:
        self.table = table

    def pick(self, target: Target) -> Route:
        candidates = self.table.candidates(target)
        route = candidates[0] if len(candidates) == 1 else self._least_in_flight(candidates)
        self.in_flight[route.name] = self.in_flight.get(route.name, 0) + 1
        return route

    def release(self, route: Route) -> None:
        left = self.in_flight.get(route.name, 1) - 1
        if left > 0:
            self.in_flight[route.name] = left
        else:
            self.in_flight.pop(route.name, None)

    def _least_in_flight(self, candidates: tuple[Route, ...]) -> Route:
        self._turn += 1
        count = len(candidates)
        best = candidates[self._turn % count]
        best_load = self.in_flight.get(best.name, 0)
        for step in range(1, count):
            route = candidates[(self._turn + step) % count]
            load = self.in_flight.get(route.name, 0)
            if load < best_load:
                best, best_load = route, load
        return best
