"""Admission: at most an instance's `max_concurrent_requests` calls in flight, the rest queued.

Each instance has one Gate. A call that finds a free slot and nobody queued goes straight
through (a compare and an increment: the uncontended path stays a few hundred nanoseconds).
Otherwise it waits in a bounded FIFO (`queue_size` calls per instance) for at most its
deadline; a freed slot is handed to the oldest waiter directly, so late arrivals never
overtake the queue. A full queue, or a wait that outlives its deadline, is refused with
Overloaded (gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After).

With `runmultiplexer --processes N` every process has its own gates, so each admits
`max_concurrent_requests // N` calls per instance (at least 1) and queues `queue_size / N`
(rounded up): together they never send an instance more than its limit, which it would
refuse (TEI answers RESOURCE_EXHAUSTED past it) instead of queueing. The price: the kernel
spreads connections, not calls, so one process may queue while another has free slots.

Gates live on the server's event loop only; the routing table they read their limit from
is swapped in by the refresher thread, and `Router.retain` hands each gate its new row on
the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

import grpc

from multiplexer import metrics

if TYPE_CHECKING:
    from multiplexer.routing import Route

RETRY_AFTER_SECS = 1


class AdmissionError(Exception):
    """A call was not admitted; carries the gRPC status code the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Overloaded(AdmissionError):
    """The instance's queue is full, or a queued call's deadline passed while it waited."""

    retry_after = RETRY_AFTER_SECS

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def process_share(limit: int, processes: int) -> int:
    """One process's part of an instance's `limit`: never more than the limit in all."""
    return max(limit // processes, 1)


class Gate:
    """One instance's slots and its queue of waiting calls."""

    __slots__ = ("in_flight", "limit", "peak", "processes", "queue_size", "route", "waiters")

    def __init__(self, route: Route, queue_size: int, processes: int = 1) -> None:
        self.route = route
        self.processes = processes
        self.limit = process_share(route.max_concurrent_requests, processes)
        self.queue_size = queue_size
        self.in_flight = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.peak = 0  # the longest queue since the traffic roll-up last looked

    @property
    def load(self) -> int:
        return self.in_flight + len(self.waiters)

    async def enter(self, timeout: float | None) -> None:
        """Take a slot, waiting in the queue for at most `timeout` seconds if need be."""
        if self.in_flight < self.limit and not self.waiters:
            self.in_flight += 1
            return
        name = self.route.name
        if len(self.waiters) >= self.queue_size:
            metrics.refused(name, "queue_full")
            raise Overloaded(
                f"instance '{name}' is overloaded: {self.in_flight} calls in flight "
                f"(max_concurrent_requests) and {len(self.waiters)} queued (queue_size)"
            )
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        depth = len(self.waiters)
        self.peak = max(self.peak, depth)
        metrics.queue_depth(name, depth)
        queued = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            if not waiter.cancelled():  # the slot came as the deadline passed: keep it
                metrics.queue_wait(name, time.perf_counter() - queued)
                return
            self._forget(waiter)
            metrics.refused(name, "deadline")
            raise Overloaded(
                f"instance '{name}' is overloaded: the call waited {timeout:g} s in its "
                "queue without a free slot"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.leave()  # handed a slot while being cancelled: pass it on
            else:
                self._forget(waiter)
            raise
        metrics.queue_wait(name, time.perf_counter() - queued)

    def leave(self) -> None:
        """Free a slot: the oldest waiter gets it, else it is free again."""
        waiters = self.waiters
        if self.in_flight > self.limit:  # the limit was lowered: shed this slot
            self.in_flight -= 1
            return
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                metrics.queue_depth(self.route.name, len(waiters))
                waiter.set_result(None)  # the slot changes hands: in_flight stays
                return
        if self.in_flight > 0:
            self.in_flight -= 1

    def update(self, route: Route) -> None:
        """A new table row for this instance: adopt its limit, admit whom it lets in."""
        self.route = route
        self.limit = process_share(route.max_concurrent_requests, self.processes)
        while self.waiters and self.in_flight < self.limit:
            self.in_flight += 1
            self._hand_over()

    def refuse_waiters(self, error: AdmissionError) -> None:
        """The instance left the table or stopped: its queued calls fail now."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        metrics.queue_depth(self.route.name, 0)

    def _hand_over(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                metrics.queue_depth(self.route.name, len(self.waiters))
                return
        self.in_flight -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            return
        metrics.queue_depth(self.route.name, len(self.waiters))
