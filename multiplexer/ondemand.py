"""Cold starts: a call for an on-demand model that finds no running instance asks the
control plane for one (registry/ondemand.py creates or starts it; the worker launches it)
and waits, within its deadline, until the routing table shows it running.

Concurrent callers share one start: the first call of a model starts it, the others
await the same future (single-flight in this process; the control plane's side is
idempotent, so several multiplexer processes still make one instance start). Warm calls
pay for one check (`Router.ready`): two set lookups on the current table.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from multiplexer.metrics import COLD_START_SECONDS, COLD_STARTS
from multiplexer.routing import RoutingError

if TYPE_CHECKING:
    from multiplexer.routing import Router

log = logging.getLogger(__name__)

POLL_SECS = 0.1


class ColdStarter:
    def __init__(
        self,
        router: Router,
        ask: Callable[[str], str],
        refresh: Callable[[], object],
        wait_secs: float,
    ) -> None:
        """`ask(model_id)`: have an instance of the model started (blocking; run on a
        thread), returns its name. `refresh()`: reload the routing table now."""
        self.router = router
        self.ask = ask
        self.refresh = refresh
        self.wait_secs = wait_secs
        self.starts: dict[str, asyncio.Future[None]] = {}

    async def wait(self, model_id: str, timeout: float | None) -> None:
        """Return once an instance of `model_id` runs; RoutingError when none does within
        `timeout` (None: wait_secs)."""
        start = self.starts.get(model_id)
        if start is None:
            start = self.starts[model_id] = asyncio.ensure_future(self._start(model_id))
            start.add_done_callback(lambda _: self.starts.pop(model_id, None))
        budget = self.wait_secs if timeout is None else min(timeout, self.wait_secs)
        try:
            await asyncio.wait_for(asyncio.shield(start), budget)
        except TimeoutError:
            raise RoutingError(
                grpc.StatusCode.UNAVAILABLE,
                f"model '{model_id}': no instance started within {budget:.1f} s (it is on "
                "demand: a later call finds it running once it has loaded)",
            ) from None

    async def _start(self, model_id: str) -> None:
        began = time.perf_counter()
        try:
            name = await asyncio.to_thread(self.ask, model_id)
        except Exception as exc:
            log.warning("model %s: on-demand start refused: %s", model_id, exc)
            raise RoutingError(
                grpc.StatusCode.UNAVAILABLE, f"model '{model_id}': on-demand start failed: {exc}"
            ) from None
        log.info("model %s: cold start of instance %s", model_id, name)
        deadline = began + self.wait_secs
        while time.perf_counter() < deadline:
            await asyncio.to_thread(self.refresh)
            table = self.router.table
            if model_id in table.running_models:
                seconds = time.perf_counter() - began
                COLD_STARTS.labels(model_id).inc()
                COLD_START_SECONDS.labels(model_id).observe(seconds)
                log.info("model %s: instance %s running after %.2f s", model_id, name, seconds)
                return
            route = table.by_name.get(name)
            if route is not None and route.status == "failed":
                raise RoutingError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"model '{model_id}': instance '{name}' failed to start (see its log)",
                )
            await asyncio.sleep(POLL_SECS)
        raise RoutingError(
            grpc.StatusCode.UNAVAILABLE,
            f"model '{model_id}': instance '{name}' not running after {self.wait_secs:.0f} s",
        )
