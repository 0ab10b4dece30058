"""One gRPC channel per instance address, reused by every call to it.

Lives on the server's event loop. Calls go out without serialisers: the multiplexer hands
the instance the inner request bytes and the client the response bytes, untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from multiplexer.grpc_fixes import keep_status_on_failed_writes


class ChannelPool:
    def __init__(self, options: Sequence[tuple[str, Any]] = ()) -> None:
        keep_status_on_failed_writes()  # an instance's status must reach the client as is
        self.options = tuple(options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._unary: dict[tuple[str, str], grpc.aio.UnaryUnaryMultiCallable] = {}
        self._stream_unary: dict[tuple[str, str], grpc.aio.StreamUnaryMultiCallable] = {}
        self._stream: dict[tuple[str, str], grpc.aio.StreamStreamMultiCallable] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def unary_unary(self, address: str, path: str) -> grpc.aio.UnaryUnaryMultiCallable:
        call = self._unary.get((address, path))
        if call is None:
            call = self._unary[(address, path)] = self.channel(address).unary_unary(path)
        return call

    def stream_unary(self, address: str, path: str) -> grpc.aio.StreamUnaryMultiCallable:
        call = self._stream_unary.get((address, path))
        if call is None:
            call = self.channel(address).stream_unary(path)
            self._stream_unary[(address, path)] = call
        return call

    def stream_stream(self, address: str, path: str) -> grpc.aio.StreamStreamMultiCallable:
        call = self._stream.get((address, path))
        if call is None:
            call = self._stream[(address, path)] = self.channel(address).stream_stream(path)
        return call

    def channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.insecure_channel(address, options=self.options)
            self._channels[address] = channel
        return channel

    def retain(self, addresses: Iterable[str], grace: float = 5.0) -> None:
        """Close the channels of addresses no longer in the table (after a grace period)."""
        keep = set(addresses)
        for address in [a for a in self._channels if a not in keep]:
            channel = self._channels.pop(address)
            for calls in (self._unary, self._stream_unary, self._stream):
                for key in [k for k in calls if k[0] == address]:
                    del calls[key]
            task = asyncio.ensure_future(channel.close(grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self.retain(())
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
