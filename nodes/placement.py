"""Where an instance goes, and its ports there.

A create without `node` goes, with `placement = "spread"`, to the registered node that is
up and has a free port, with the fewest instances (then the most free GPU memory, then by
name); with `placement = "local"`, or while no node is registered at all (a fresh install
whose worker has not written its row yet), to the creating process's own node
(TEI_MANAGER_NODE), as on a single host. A create with `node` goes there: 404
NODE_NOT_FOUND for a node never registered, 409 NODE_DOWN for one that is down.

Ports come from the chosen node's own ranges (its worker's configuration), unique per node.
Only this host's ports can be probed: a port in use by something else on another node
fails that instance's start, which names it.

Called inside the create's (or the move's) transaction: the chosen node's row is locked
(`select_for_update`, a row lock on PostgreSQL; SQLite's IMMEDIATE transaction already
holds the database), so that two creates on one node cannot take the same port.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from django.conf import settings

from instances import process
from instances.errors import NodeDown, NodeNotFound, PortConflict
from instances.models import Instance
from nodes.models import Node


@dataclass(frozen=True)
class Target:
    """A node chosen for an instance: where it runs, where it is dialled, its ranges."""

    node: str
    host: str
    ports: tuple[int, int]
    prometheus_ports: tuple[int, int]

    @property
    def local(self) -> bool:
        return self.node == settings.NODE_NAME

    @classmethod
    def of(cls, node: Node) -> Target:
        return cls(
            node=node.name,
            host=node.instance_host,
            ports=(node.port_start, node.port_end),
            prometheus_ports=(node.prometheus_port_start, node.prometheus_port_end),
        )


def place(requested: str | None = None) -> Target:
    """The node for a new instance (see the module's docstring)."""
    if requested:
        node = Node.objects.select_for_update().filter(name=requested).first()
        if node is None:
            raise NodeNotFound(f"node '{requested}' not found (GET /nodes lists them)")
        if not node.is_up:
            raise NodeDown(f"node '{requested}' is down: no heartbeat since {node.last_seen}")
        return Target.of(node)
    if settings.TEI.placement == "local" or not Node.objects.exists():
        return local_target()
    target = choose(exclude=())
    if target is None:
        raise NodeDown("no registered node is up with a free port (GET /nodes lists them)")
    return target


def choose(exclude: Collection[str]) -> Target | None:
    """The up node (not in `exclude`) with room that has the fewest instances, then the
    most free GPU memory; None when there is none. Its row is locked."""
    nodes = Node.objects.up().exclude(name__in=list(exclude)).with_instance_counts()
    with_room = [
        node for node in nodes if node.instance_count < node.port_end - node.port_start + 1
    ]
    if not with_room:
        return None
    best = min(with_room, key=lambda n: (n.instance_count, -n.gpu_memory_free_bytes, n.name))
    locked = Node.objects.select_for_update().get(pk=best.pk)
    return Target.of(locked)


def local_target() -> Target:
    """This process's own node, as its configuration describes it (its row, if it has
    one, is locked: a failover may be moving an instance there)."""
    Node.objects.select_for_update().filter(name=settings.NODE_NAME).first()
    config = settings.TEI
    return Target(
        node=settings.NODE_NAME,
        host=settings.INSTANCE_HOST,
        ports=(config.instance_port_start, config.instance_port_end),
        prometheus_ports=(config.prometheus_port_start, config.prometheus_port_end),
    )


def allocate_ports(
    target: Target, port: int | None = None, prometheus_port: int | None = None
) -> tuple[int, int]:
    """The instance port and the Prometheus port on `target`: the ones asked for if free
    there, else the first free ones of its ranges; PortConflict when none is."""
    used = ports_in_use(target.node)
    port = claim_port(port, used, *target.ports, probe=target.local)
    used.add(port)
    prometheus_port = claim_port(
        prometheus_port, used, *target.prometheus_ports, probe=target.local
    )
    return port, prometheus_port


def ports_in_use(node: str) -> set[int]:
    used: set[int] = set()
    for port, prometheus_port in Instance.objects.filter(node=node).values_list(
        "port", "prometheus_port"
    ):
        used.update((port, prometheus_port))
    return used


def claim_port(
    requested: int | None, used: set[int], first: int, last: int, probe: bool = True
) -> int:
    """`probe`: also skip ports something else holds on this host (only this host's can be
    seen)."""
    if requested is not None:
        if requested in used:
            raise PortConflict(f"port {requested} is already used by another instance")
        if probe and not process.port_is_free(requested):
            raise PortConflict(f"port {requested} is already in use on this host")
        return requested
    for port in range(first, last + 1):
        if port not in used and (not probe or process.port_is_free(port)):
            return port
    raise PortConflict(f"no free port left in {first}-{last}")
