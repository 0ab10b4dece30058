"""TEI's batching: tokenizer workers, one FIFO queue, no timer.

Requests reach `submit()` as text. A pool of workers tokenizes them (the Rust tokenizer
runs without the GIL) and queues them; a batch takes inputs from the head of the queue
until the next one would push the padded batch past `max_batch_tokens` (or the batch
holds `max_batch_requests`). A worker that finds a runner free runs batches until the
queue is empty, while the other workers tokenize what arrives meanwhile: the next batch
forms the moment a runner is free. The pool has `--tokenization-workers` + `runners`
threads, so that as many tokenize while batches run, and a lone request is tokenized and
run by the same thread (one hand-over fewer).

With one runner (TEI's way) one forward pass runs at a time. With more, as many batches
run at once, each told whether it runs `alone` (no other batch running, none waiting):
the engine gives a batch alone every core and each of several batches one core (see
localtei.onnx_engine).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from localtei import metrics
from localtei.errors import ServingError
from localtei.jobs import Job
from localtei.tokenization import Encoded, TextInput

log = logging.getLogger(__name__)

# Runs one batch; the flag says it runs alone (no other batch running or waiting).
RunBatch = Callable[[Sequence[Job], bool], list[Any]]
Tokenize = Callable[[Sequence[TextInput]], list[Encoded | ServingError]]
# Called on a worker thread with jobs and their results (an item may be the job's
# ServingError), or one error for all of them.
Deliver = Callable[[list[Job], list[Any] | BaseException], None]


class Batcher:
    def __init__(
        self,
        run_batch: RunBatch,
        deliver: Deliver,
        max_batch_tokens: int,
        max_batch_requests: int | None = None,
        *,
        tokenize: Tokenize | None = None,
        tokenization_workers: int = 1,
        runners: int = 1,
    ) -> None:
        self._run_batch = run_batch
        self._deliver = deliver
        self._tokenize = tokenize
        self._max_batch_tokens = max_batch_tokens
        self._max_batch_requests = max_batch_requests
        self._queue: deque[Job] = deque()
        self._queue_lock = threading.Lock()  # guards the queue and the count of batches running
        self._runners = max(1, runners)
        self._running = 0
        self.workers = ThreadPoolExecutor(
            max(1, tokenization_workers) + self._runners, thread_name_prefix="localtei-worker"
        )

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs (in order); their results reach `deliver` once a batch has run them.

        Jobs with a `source` and no `encoded` are tokenized first, on a worker.
        """
        metrics.QUEUE_SIZE.inc(len(jobs))
        self.workers.submit(self._prepare, list(jobs))

    def run_on_worker(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        """Run `function` on a worker (the Tokenize and Decode calls)."""
        return self.workers.submit(function, *args)

    def stop(self) -> None:
        """Finish what is submitted, then end the workers."""
        self.workers.shutdown(wait=True)

    def _prepare(self, jobs: list[Job]) -> None:
        if self._tokenize is not None and any(job.encoded is None for job in jobs):
            jobs = self._tokenized(jobs)
        if jobs:
            now = time.perf_counter_ns()
            for job in jobs:
                job.enqueued_ns = now
            with self._queue_lock:
                self._queue.extend(jobs)
        self._drain()

    def _tokenized(self, jobs: list[Job]) -> list[Job]:
        """Tokenize the jobs that need it; deliver the refused ones; return the rest."""
        assert self._tokenize is not None
        waiting = [job for job in jobs if job.encoded is None]
        try:
            results = self._tokenize([job.source for job in waiting])  # type: ignore[misc]
        except Exception as exc:  # noqa: BLE001 - every waiting request must hear about it
            log.exception("tokenization failed for %d inputs", len(waiting))
            metrics.QUEUE_SIZE.dec(len(jobs))
            self._deliver(jobs, exc)
            return []
        now = time.perf_counter_ns()
        failed: list[Job] = []
        errors: list[Any] = []
        for job, result in zip(waiting, results, strict=True):
            job.tokenized_ns = now
            if isinstance(result, ServingError):
                failed.append(job)
                errors.append(result)
            else:
                job.encoded = result
        if not failed:
            return jobs
        metrics.QUEUE_SIZE.dec(len(failed))
        self._deliver(failed, errors)
        return [job for job in jobs if job.encoded is not None]

    def _drain(self) -> None:
        """Run batches until the queue is empty, unless every runner is busy.

        The queue is checked again, under the same lock, after a batch ends: a job queued
        by a worker that found every runner busy a moment before is run, never stranded.
        """
        while True:
            with self._queue_lock:
                if not self._queue or self._running >= self._runners:
                    return
                batch = take_batch(self._queue, self._max_batch_tokens, self._max_batch_requests)
                self._running += 1
                alone = self._running == 1 and not self._queue
            try:
                self._run(batch, alone)
            finally:
                with self._queue_lock:
                    self._running -= 1

    def _run(self, batch: list[Job], alone: bool) -> None:
        start = time.perf_counter_ns()
        for job in batch:
            job.queue_ns = start - job.enqueued_ns
        metrics.QUEUE_SIZE.dec(len(batch))
        metrics.BATCH_NEXT_SIZE.observe(len(batch))
        metrics.BATCH_NEXT_TOKENS.observe(sum(job.tokens for job in batch))
        metrics.BATCH_INFERENCE_COUNT.inc()
        try:
            results: list[Any] | BaseException = self._run_batch(batch, alone)
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
    longest = batch[0].tokens
    while queue and (max_batch_requests is None or len(batch) < max_batch_requests):
        candidate = max(longest, queue[0].tokens)
        if candidate * (len(batch) + 1) > max_batch_tokens:
            break
        batch.append(queue.popleft())
        longest = candidate
    return batch
