"""Context that travels with a Celery task: the request id of the request that enqueued it,
and the W3C trace context of the span that was current (a create, a repair), so that the
worker's log lines and spans belong to the request and the trace that caused them.

Both ride in the message's headers (`x-request-id`, `traceparent`, `tracestate`), set as
the task is published and read back as it runs. A task enqueued outside any request gets
its own id as request id.
"""

from __future__ import annotations

from typing import Any

from celery import signals

from telemetry import tracing
from telemetry.logs import REQUEST_ID, REQUEST_ID_HEADER

TRACE_HEADERS = (tracing.TRACEPARENT, tracing.TRACESTATE)


@signals.before_task_publish.connect
def carry_context(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    if headers is None:
        return
    request_id = REQUEST_ID.get()
    if request_id:
        headers.setdefault(REQUEST_ID_HEADER, request_id)
    if tracing.TRACEPARENT not in headers:  # a context given by the caller wins
        headers.update(tracing.carrier())


@signals.task_prerun.connect
def adopt_request_id(task: Any = None, task_id: str | None = None, **kwargs: Any) -> None:
    request = getattr(task, "request", None)
    carried = request.get(REQUEST_ID_HEADER) if request is not None else None
    REQUEST_ID.set(carried or task_id)


@signals.task_postrun.connect
def forget_request_id(**kwargs: Any) -> None:
    REQUEST_ID.set(None)


def task_trace(request: Any) -> dict[str, str]:
    """The W3C headers the running task's message carried ({} without them)."""
    return {name: request.get(name) for name in TRACE_HEADERS if request.get(name)}
