"""NVML (pynvml) access: how many GPUs, and their memory and utilisation. No GPU, no NVML,
or a broken driver all read as "no GPU here" (None / [])."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pynvml

_lock = threading.Lock()
_initialised = False


@dataclass(frozen=True)
class GpuStats:
    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_percent: int


def device_count() -> int | None:
    """The number of GPUs NVML sees, or None when there is no usable NVML."""
    if not _init():
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except pynvml.NVMLError:
        return None


def stats() -> list[GpuStats]:
    count = device_count()
    result = []
    for index in range(count or 0):
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
            name = pynvml.nvmlDeviceGetName(handle)
        except pynvml.NVMLError:
            continue
        result.append(
            GpuStats(
                index=index,
                name=name.decode() if isinstance(name, bytes) else str(name),
                memory_used_bytes=int(memory.used),
                memory_total_bytes=int(memory.total),
                utilization_percent=int(utilization.gpu),
            )
        )
    return result


def _init() -> bool:
    global _initialised
    with _lock:
        if not _initialised:
            try:
                pynvml.nvmlInit()
            except (pynvml.NVMLError, OSError):
                return False
            _initialised = True
        return True
