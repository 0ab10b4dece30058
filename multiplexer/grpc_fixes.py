"""A fix for grpcio's asyncio client, applied by the multiplexer at import.

grpc/grpc#36066 (open in grpcio 1.85, fix proposed in grpc/grpc#43486): when a server ends
a client-streaming call while the client is still writing (an instance refusing a stream
at once, or failing on its fifth message), the client's next write fails and
`_StreamRequestMixin._write` overwrites the status the server sent with
`INTERNAL: Internal error from Core`. A multiplexer must hand the instance's status on
unchanged, so `_write` is replaced by a copy that, on a failed write, waits for the
status Core is about to deliver, and only where none comes reports the failure itself
(the hang grpc/grpc#34148 guarded against).
"""

from __future__ import annotations

import asyncio
from typing import Any

from grpc._cython import cygrpc
from grpc.aio import _call

STATUS_WAIT_SECONDS = 1.0


async def _write(self: Any, request: Any) -> None:
    if self.done():
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS)
    if self._done_writing_flag:
        raise asyncio.InvalidStateError(_call._RPC_HALF_CLOSED_DETAILS)
    if not self._metadata_sent.is_set():
        await self._metadata_sent.wait()
        if self.done():
            await self._raise_for_status()
    serialized = _call._common.serialize(request, self._request_serializer)
    try:
        await self._cython_call.send_serialized_message(serialized)
    except cygrpc.InternalError as err:
        try:
            status = asyncio.shield(self._cython_call.status())
            await asyncio.wait_for(status, STATUS_WAIT_SECONDS)
        except TimeoutError:
            self._cython_call.set_internal_error(str(err))
        await self._raise_for_status()
        # The server ended the call with OK before reading this message.
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS) from None
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


def keep_status_on_failed_writes() -> bool:
    """Install the fixed `_write` where grpcio's own has the bug; True when installed."""
    mixin = _call._StreamRequestMixin
    if mixin._write is _write:
        return True
    if "set_internal_error" not in mixin._write.__code__.co_names:
        return False  # a grpcio whose _write no longer overwrites the status: keep it
    mixin._write = _write  # type: ignore[method-assign]
    return True
