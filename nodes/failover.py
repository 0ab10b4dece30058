"""Failover: an instance with `failover` on a node that is down (no heartbeat for
`node_timeout_secs`) is placed again on a node that is up, with new ports there, and
launched by that node's worker.

Nothing runs twice. The move is one compare-and-set on the row (still on the down node),
in the transaction that records the process it leaves behind as an OrphanProcess of the
old node; a worker acts only on rows of its own node (supervisor._own), so a message sent
to the old node before the move finds nothing; and the old node's worker, when it comes
back, stops the orphan (at start-up, tasks.restore_instances) before anything else.

Called by the beat tick (instances.tasks.reconcile), which enqueues the launches and kills.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from instances.errors import PortConflict
from instances.models import DesiredState, Instance, OrphanProcess, Status
from nodes import placement
from nodes.models import Node

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Move:
    """Instance `pk` left `old_node` for `new_node`; `orphan`: the OrphanProcess (of the
    old node) recorded for the process it left there, if any."""

    pk: int
    name: str
    old_node: str
    new_node: str
    orphan: int | None


def fail_over() -> list[Move]:
    """Move every failover instance off the nodes that are down, where another is up."""
    down = list(Node.objects.down().values_list("name", flat=True))
    if not down:
        return []
    stranded = (
        Instance.objects.filter(node__in=down, failover=True, desired_state=DesiredState.RUNNING)
        .exclude(status=Status.FAILED)
        .values_list("pk", flat=True)
    )
    moves = []
    for pk in stranded:
        try:
            move = move_instance(pk, down)
        except PortConflict as exc:
            log.warning("instance #%s: cannot fail over: %s", pk, exc)
            continue
        if move is not None:
            moves.append(move)
    return moves


def move_instance(pk: int, down: Collection[str]) -> Move | None:
    """Place instance `pk` (while still on a node in `down`) on the best up node; None when
    no node has room (or the row moved, changed or went meanwhile)."""
    with transaction.atomic():
        instance = (
            Instance.objects.select_for_update()
            .filter(pk=pk, node__in=list(down), failover=True)
            .first()
        )
        if instance is None:
            return None
        target = placement.choose(exclude=down)
        if target is None:
            log.warning("instance %s: its node is down and no other node has room", instance.name)
            return None
        port, prometheus_port = placement.allocate_ports(target)
        old_node = instance.node
        orphan = None
        if instance.pid:
            orphan = OrphanProcess.objects.create(
                node=old_node,
                name=instance.name,
                pid=instance.pid,
                process_started_at=instance.process_started_at,
            )
        ran = instance.pid is not None
        reason = f"node '{old_node}' is down: moved to node '{target.node}'"
        Instance.objects.filter(pk=pk, node=old_node).update(
            node=target.node,
            host=target.host,
            port=port,
            prometheus_port=prometheus_port,
            status=Status.PENDING,
            pid=None,
            process_started_at=None,
            # Whatever the old node's worker still holds of this row can no longer write.
            launch_token=uuid.uuid4().hex,
            started_at=None,
            restarts=F("restarts") + int(ran),
            failed_starts=0,
            health_check_failures=0,
            next_restart_at=None,
            last_error=reason,
            updated_at=timezone.now(),
        )
    log.warning("instance %s: %s (port %s)", instance.name, reason, port)
    return Move(pk, instance.name, old_node, target.node, orphan.pk if orphan else None)
