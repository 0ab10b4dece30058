"""The suite's one stand-in: NVML, for the GPUs this machine does not have.

`use_fake_gpus(monkeypatch, cards)` makes `instances.gpu` see `cards`, each
(name, memory used, memory total, utilisation %); `use_no_nvml(monkeypatch)` makes it see
a host without NVML (no driver), whatever this machine has. monkeypatch undoes both.
Without them the tests meet the real pynvml, which may or may not find a GPU.
"""

from __future__ import annotations

import types

import pytest

from instances import gpu

Card = tuple[str, int, int, int]


class FakeNvmlError(Exception):
    pass


def fake_pynvml(cards: list[Card]) -> types.SimpleNamespace:
    def handle(index: int) -> int:
        if index >= len(cards):
            raise FakeNvmlError("Invalid Argument")
        return index

    return types.SimpleNamespace(
        NVMLError=FakeNvmlError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(cards),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetName=lambda h: cards[h][0],
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
            used=cards[h][1], total=cards[h][2], free=cards[h][2] - cards[h][1]
        ),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=cards[h][3], memory=0),
    )


def use_fake_gpus(monkeypatch: pytest.MonkeyPatch, cards: list[Card]) -> None:
    monkeypatch.setattr(gpu, "pynvml", fake_pynvml(cards))
    monkeypatch.setattr(gpu, "_initialised", False)


def use_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_driver() -> None:
        raise FakeNvmlError("Driver Not Loaded")

    nvml = fake_pynvml([])
    nvml.nvmlInit = no_driver
    monkeypatch.setattr(gpu, "pynvml", nvml)
    monkeypatch.setattr(gpu, "_initialised", False)
