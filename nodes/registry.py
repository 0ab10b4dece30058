"""What a worker writes about its node: called from its heartbeat thread
(instances/heartbeats.py) every few seconds, so the row is also the node's heartbeat."""

from __future__ import annotations

import os
from typing import Any

import psutil
from django.conf import settings
from django.utils import timezone

from instances import gpu
from nodes.models import Node


def register(node: str) -> Node:
    """Create or refresh `node`'s row with this host's capacity, seen now."""
    node_row, _ = Node.objects.update_or_create(name=node, defaults=describe())
    return node_row


def describe() -> dict[str, Any]:
    """This host as its worker sees it: addresses, port ranges, GPUs, CPUs, memory."""
    from teimanager import __version__

    config = settings.TEI
    return {
        "instance_host": settings.INSTANCE_HOST,
        "port_start": config.instance_port_start,
        "port_end": config.instance_port_end,
        "prometheus_port_start": config.prometheus_port_start,
        "prometheus_port_end": config.prometheus_port_end,
        "gpus": [
            {
                "index": stats.index,
                "name": stats.name,
                "memory_total_bytes": stats.memory_total_bytes,
                "memory_free_bytes": max(stats.memory_total_bytes - stats.memory_used_bytes, 0),
            }
            for stats in gpu.stats()
        ],
        "cpu_count": os.cpu_count() or 0,
        "ram_bytes": psutil.virtual_memory().total,
        "version": __version__,
        "last_seen": timezone.now(),
    }
