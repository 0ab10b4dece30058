"""TEI's batching: one FIFO queue, one inference thread, no wait timer.

A batch takes requests from the head of the queue until the next one would push the
padded batch past `max_batch_tokens` (or the batch holds `max_batch_requests`); the
next batch forms the moment the model is free, from whatever has queued meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from localtei import metrics
from localtei.jobs import Job

log = logging.getLogger(__name__)

RunBatch = Callable[[Sequence[Job]], list[Any]]
# Called on the inference thread with the batch and its results (or the error).
Deliver = Callable[[list[Job], list[Any] | BaseException], None]


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        deliver: Deliver,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._deliver = deliver
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_requests = max_batch_requests
        self._queue: deque[Job] = deque()
        self._ready = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="localtei-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (in order); their results reach `deliver` once a batch has run them."""
        now = time.perf_counter_ns()
        for job in jobs:
            job.enqueued_ns = now
        with self._ready:
            self._queue.extend(jobs)
            self._ready.notify()
        metrics.QUEUE_SIZE.inc(len(jobs))

    def stop(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then end the inference thread."""
        with self._ready:
            self._stopping = True
            self._ready.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._stopping:
                    self._ready.wait()
                if not self._queue:
                    return
                batch = take_batch(self._queue, self._max_batch_tokens, self._max_batch_requests)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        start = time.perf_counter_ns()
        for job in batch:
            job.queue_ns = start - job.enqueued_ns
        metrics.QUEUE_SIZE.dec(len(batch))
        metrics.BATCH_NEXT_SIZE.observe(len(batch))
        metrics.BATCH_NEXT_TOKENS.observe(sum(len(job.encoded.ids) for job in batch))
        metrics.BATCH_INFERENCE_COUNT.inc()
        try:
            results: list[Any] | BaseException = self._run_batch(batch)
            metrics.BATCH_INFERENCE_SUCCESS.inc()
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("inference failed for a batch of %d", len(batch))
            results = exc
        metrics.BATCH_INFERENCE_DURATION.observe((time.perf_counter_ns() - start) / 1e9)
        self._deliver(batch, results)


def take_batch(
    queue: deque[Job], max_batch_tokens: int, max_batch_requests: int | None
) -> list[Job]:
    """Pop the next batch off the head of `queue`; always at least one job.

    Tokens are counted padded (longest input x batch size): that is what the forward pass
    costs, and what TEI counts for padded backends.
    """
    batch = [queue.popleft()]
    longest = len(batch[0].encoded.ids)
    while queue and (max_batch_requests is None or len(batch) < max_batch_requests):
        candidate = max(longest, len(queue[0].encoded.ids))
        if candidate * (len(batch) + 1) > max_batch_tokens:
            break
        batch.append(queue.popleft())
        longest = candidate
    return batch
