"""Memory-aware placement: which GPU a new instance goes to, or why none can take it.

A model's memory estimate comes from the registry (what its check measured, else its
weights' size times a dtype factor plus a margin). A GPU's free memory is its total less
the larger of what NVML reports used (less what instances on their way out still hold)
and the estimates of the instances placed on it that are active: an instance still
loading has not allocated yet, and NVML alone would count it as free. Without a GPU the
host's available RAM is the budget, less the estimates of instances still loading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil

from instances import gpu
from instances.errors import InsufficientMemory
from instances.models import Instance, Status

Estimate = Callable[[str], int | None]  # model id -> bytes an instance of it needs


@dataclass(frozen=True)
class Device:
    gpu_id: int | None  # None: the host's RAM
    free: int


def place(needed: int, gpu_id: int | None, estimate: Estimate) -> int | None:
    """The GPU for a new instance that needs `needed` bytes: `gpu_id` when given and it
    fits, else the GPU with the most free memory that fits; None on a host without GPUs
    whose RAM fits. InsufficientMemory (with the figures) when nothing fits."""
    devices = free_memory(estimate)
    if devices[0].gpu_id is None:
        return _fit(needed, devices[0], "the host's available memory")
    if gpu_id is not None:
        device = next((d for d in devices if d.gpu_id == gpu_id), None)
        if device is None:
            return gpu_id  # not a GPU NVML reports (the serializer checked the index)
        return _fit(needed, device, f"GPU {gpu_id}")
    best = max(devices, key=lambda d: d.free)
    if best.free < needed:
        raise InsufficientMemory(
            f"no GPU has {_gib(needed)} free for this model (most free: GPU {best.gpu_id}, "
            f"{_gib(best.free)})",
            details={
                "needed_bytes": needed,
                "free_bytes": {str(d.gpu_id): d.free for d in devices},
            },
        )
    return best.gpu_id


def free_memory(estimate: Estimate) -> list[Device]:
    """Free memory per GPU, or one Device(None, ...) for the host when there is no GPU."""
    active = list(
        Instance.objects.filter(status__in=[*Status.active(), Status.STOPPING]).values_list(
            "model_id", "gpu_id", "status"
        )
    )
    gpus = gpu.stats()
    if not gpus:
        loading = sum(
            estimate(model_id) or 0
            for model_id, _, status in active
            if status in (Status.PENDING, Status.STARTING)
        )
        return [Device(None, int(psutil.virtual_memory().available) - loading)]
    devices = []
    for card in gpus:
        placed = [(m, s) for m, g, s in active if g == card.index]
        held = sum(estimate(m) or 0 for m, s in placed if s in Status.active())
        leaving = sum(estimate(m) or 0 for m, s in placed if s == Status.STOPPING)
        used = max(card.memory_used_bytes - leaving, held)
        devices.append(Device(card.index, card.memory_total_bytes - used))
    return devices


def _fit(needed: int, device: Device, where: str) -> int | None:
    if device.free < needed:
        raise InsufficientMemory(
            f"{where} has {_gib(device.free)} free; this model needs {_gib(needed)}",
            details={
                "needed_bytes": needed,
                "free_bytes": device.free,
                "device": "cpu" if device.gpu_id is None else f"gpu {device.gpu_id}",
            },
        )
    return device.gpu_id


def _gib(value: int) -> str:
    return f"{value / 2**30:.2f} GiB"
