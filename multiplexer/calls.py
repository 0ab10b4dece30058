"""Calls the multiplexer makes to an instance on its own account (Arrow rows, HTTP inputs).

Every one passes admission: a unary call takes one slot; a stream takes one slot per
message in flight, taking the next only when it has one, so a batch of N inputs holds at
most one place in the instance's queue and never floods it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence

from multiplexer.admission import AdmissionError
from multiplexer.arrow import InstanceReplyError
from multiplexer.channels import ChannelPool
from multiplexer.routing import Route, Router

Metadata = tuple[tuple[str, str | bytes], ...] | None


class StreamSlots:
    """The slots one stream holds on its instance: one per message sent and not answered."""

    __slots__ = ("held", "route", "router", "timeout")

    def __init__(self, router: Router, route: Route, timeout: Callable[[], float | None]) -> None:
        self.router, self.route, self.timeout = router, route, timeout
        self.held = 0

    async def take(self) -> None:
        await self.router.enter(self.route, self.timeout())
        self.held += 1

    def give(self) -> None:
        if self.held:
            self.held -= 1
            self.router.release(self.route)

    def give_all(self) -> None:
        while self.held:
            self.give()


class InstanceCalls:
    def __init__(self, router: Router, pool: ChannelPool) -> None:
        self.router = router
        self.pool = pool

    async def unary(
        self, route: Route, path: str, request: bytes, timeout: float, metadata: Metadata = None
    ) -> bytes:
        """One call, one slot; `timeout` bounds the queue wait and the call together."""
        deadline = time.monotonic() + timeout
        await self.router.enter(route, timeout)
        try:
            response: bytes = await self.pool.unary_unary(route.address, path)(
                request, timeout=max(deadline - time.monotonic(), 0.001), metadata=metadata
            )
        finally:
            self.router.release(route)
        return response

    async def client_stream(
        self,
        route: Route,
        path: str,
        requests: Sequence[bytes],
        timeout: float,
        metadata: Metadata = None,
    ) -> bytes:
        """Many requests in, one answer out (RerankStream): one slot for the whole call."""
        deadline = time.monotonic() + timeout
        await self.router.enter(route, timeout)
        try:
            response: bytes = await self.pool.stream_unary(route.address, path)(
                iter(requests),
                timeout=max(deadline - time.monotonic(), 0.001),
                metadata=metadata,
            )
        finally:
            self.router.release(route)
        return response

    async def stream(
        self,
        route: Route,
        path: str,
        requests: Sequence[bytes],
        timeout: float,
        metadata: Metadata = None,
    ) -> list[bytes]:
        """The requests as one stream with many in flight, one answer each, in order."""
        deadline = time.monotonic() + timeout
        slots = StreamSlots(self.router, route, lambda: max(deadline - time.monotonic(), 0.0))
        refused: list[AdmissionError] = []

        async def admitted() -> AsyncIterator[bytes]:
            for request in requests:
                try:
                    await slots.take()
                except AdmissionError as exc:
                    refused.append(exc)  # end the stream; raised once the answers are in
                    return
                yield request

        call = self.pool.stream_stream(route.address, path)(
            admitted(), timeout=timeout, metadata=metadata
        )
        replies: list[bytes] = []
        try:
            async for reply in call:
                slots.give()
                replies.append(reply)
        finally:
            slots.give_all()
            if not call.done():
                call.cancel()
        if refused:
            raise refused[0]
        if len(replies) != len(requests):
            raise InstanceReplyError(
                f"instance '{route.name}' answered {len(replies)} of {len(requests)} requests"
            )
        return replies
