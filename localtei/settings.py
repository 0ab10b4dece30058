"""The server's settings, as parsed from text-embeddings-router's flags, and the knobs
localtei reads from its environment (LOCALTEI_NUM_THREADS, LOCALTEI_RUNNERS, LOCALTEI_CACHE,
LOCALTEI_LOOP)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("auto", "onnx", "torch")
LOOP_KINDS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True)
class Settings:
    model_id: str
    revision: str | None = None
    dtype: str | None = None
    pooling: str | None = None
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool = False
    tokenization_workers: int | None = None
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    prometheus_port: int = 9000
    json_output: bool = False
    huggingface_hub_cache: str | None = None
    api_key: str | None = None
    payload_limit: int = 2_000_000
    backend: str = "auto"


def core_count() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def default_num_threads() -> int:
    """Intra-op threads for the forward pass: LOCALTEI_NUM_THREADS, else every core (as TEI)."""
    return _env_count("LOCALTEI_NUM_THREADS") or core_count()


def configured_runners() -> int | None:
    """Batches ONNX Runtime may run at once: LOCALTEI_RUNNERS, else None (decided by the
    engine, see localtei.onnx_engine.runners_for)."""
    return _env_count("LOCALTEI_RUNNERS")


def event_loop_factory(kind: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's loop for "uvloop", asyncio's for "asyncio", uvloop's if installed for "auto"
    (ValueError for another kind, ImportError for "uvloop" without it). The multiplexer's
    `--loop` and localtei's LOCALTEI_LOOP both choose with it."""
    if kind not in LOOP_KINDS:
        raise ValueError(f"unknown event loop {kind!r}: choose one of {', '.join(LOOP_KINDS)}")
    if kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise
        else:
            return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


def loop_kind(loop: asyncio.AbstractEventLoop) -> str:
    """Which loop runs ("uvloop" or "asyncio"), for the start-up log."""
    return type(loop).__module__.split(".")[0]


def configured_event_loop() -> Callable[[], asyncio.AbstractEventLoop]:
    """The server's event loop, from LOCALTEI_LOOP (default "auto"): each request wakes the
    loop from a worker thread when its batch is done, and uvloop's wake-ups cost less
    (benchmarks/localtei_floor.py). StartupError (one line) when it cannot be had."""
    from localtei.errors import StartupError

    kind = os.environ.get("LOCALTEI_LOOP", "").strip() or "auto"
    try:
        return event_loop_factory(kind)
    except ValueError as exc:
        raise StartupError(f"LOCALTEI_LOOP: {exc}") from None
    except ImportError:
        raise StartupError(
            "LOCALTEI_LOOP=uvloop, but uvloop is not installed (pip install uvloop)"
        ) from None


def _env_count(name: str) -> int | None:
    """A count from the environment: None when unset or empty, StartupError (one line)
    when it is not a whole number >= 1."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        from localtei.errors import StartupError

        raise StartupError(f"{name} must be a whole number >= 1, not {value!r}")
    return int(value)


def default_cache_dir() -> Path:
    """Where exported ONNX models are kept: LOCALTEI_CACHE, else `localtei` in HF_HOME."""
    configured = os.environ.get("LOCALTEI_CACHE")
    if configured:
        return Path(configured).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "localtei"
