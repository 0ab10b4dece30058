"""The `tei.v1` servicers: validate, queue, await tokenization and the batch, answer.

Every handler runs on the asyncio event loop; tokenization and the forward pass run on
the batcher's workers, and their results come back through `deliver()`. An Embed answer
is built from the vector's bytes (see `packed_floats`), not from Python floats.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from tei.v1 import tei_pb2, tei_pb2_grpc

from localtei import __version__, metrics
from localtei.batching import Batcher
from localtei.errors import (
    BackendError,
    OverloadedError,
    ServingError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)
from localtei.handlers import add_servicer
from localtei.jobs import Job, Task
from localtei.settings import Settings, core_count
from localtei.spec import ModelKind
from localtei.tokenization import TextInput

if TYPE_CHECKING:  # torch stays unimported until the server listens
    from localtei.model import Model

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")

_LEFT = tei_pb2.TRUNCATION_DIRECTION_LEFT
_MODEL_TYPES = {
    ModelKind.EMBEDDING: tei_pb2.MODEL_TYPE_EMBEDDING,
    ModelKind.CLASSIFIER: tei_pb2.MODEL_TYPE_CLASSIFIER,
    ModelKind.RERANKER: tei_pb2.MODEL_TYPE_RERANKER,
}
SERVICE_NAMES = tuple(service.full_name for service in tei_pb2.DESCRIPTOR.services_by_name.values())


def served_services(kind: ModelKind) -> set[str]:
    """The `tei.v1` services a model of this kind answers (health says SERVING for them)."""
    names = {"tei.v1.Info", "tei.v1.Tokenize"}
    if kind is ModelKind.EMBEDDING:
        return names | {"tei.v1.Embed"}
    if kind is ModelKind.RERANKER:
        return names | {"tei.v1.Predict", "tei.v1.Rerank"}
    return names | {"tei.v1.Predict"}


def add_tei_services(service: TeiService, server: grpc.aio.Server) -> None:
    for descriptor in tei_pb2.DESCRIPTOR.services_by_name.values():
        # A malformed message in a stream is answered like any invalid request, after
        # the answers to the messages before it.
        add_servicer(server, service, descriptor, stream_error=ValidationError)


class TeiService(
    tei_pb2_grpc.InfoServicer,
    tei_pb2_grpc.EmbedServicer,
    tei_pb2_grpc.PredictServicer,
    tei_pb2_grpc.RerankServicer,
    tei_pb2_grpc.TokenizeServicer,
):
    """All five `tei.v1` services over one model; UNAVAILABLE until `attach()`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model: Model | None = None
        self._batcher: Batcher | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._permits = asyncio.Semaphore(settings.max_concurrent_requests)
        self._bearer = f"Bearer {settings.api_key}" if settings.api_key else None
        self._unsubmitted: list[Job] = []

    def attach(self, model: Model, batcher: Batcher) -> None:
        """Start answering with `model`; call on the event loop."""
        self._loop = asyncio.get_running_loop()
        self.model, self._batcher = model, batcher

    def detach(self) -> None:
        self.model = None

    def deliver(self, jobs: list[Job], results: list[Any] | BaseException) -> None:
        """The batcher's callback (inference thread): hand results to the waiting handlers."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_resolve, jobs, results)

    # --- Info ---------------------------------------------------------------------------

    async def Info(self, request: tei_pb2.InfoRequest, context: Any) -> tei_pb2.InfoResponse:
        return await self._unary("info", context, self._info, infer=False)

    # --- Embed --------------------------------------------------------------------------

    async def Embed(self, request: tei_pb2.EmbedRequest, context: Any) -> tei_pb2.EmbedResponse:
        return await self._unary("embed", context, lambda: self._embed(request))

    async def EmbedStream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in self._stream("embed", requests, context, self._embed):
            yield response

    async def EmbedSparse(self, request: Any, context: Any) -> tei_pb2.EmbedSparseResponse:
        return await self._unary("embed_sparse", context, lambda: self._embed_sparse(request))

    async def EmbedSparseStream(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in self._stream("embed_sparse", requests, context, self._embed_sparse):
            yield response

    async def EmbedAll(self, request: Any, context: Any) -> tei_pb2.EmbedAllResponse:
        return await self._unary("embed_all", context, lambda: self._embed_all(request))

    async def EmbedAllStream(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in self._stream("embed_all", requests, context, self._embed_all):
            yield response

    # --- Predict ------------------------------------------------------------------------

    async def Predict(self, request: Any, context: Any) -> tei_pb2.PredictResponse:
        return await self._unary("predict", context, lambda: self._predict(request))

    async def PredictPair(self, request: Any, context: Any) -> tei_pb2.PredictResponse:
        return await self._unary("predict", context, lambda: self._predict_pair(request))

    async def PredictStream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in self._stream("predict", requests, context, self._predict):
            yield response

    async def PredictPairStream(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in self._stream("predict", requests, context, self._predict_pair):
            yield response

    # --- Rerank -------------------------------------------------------------------------

    async def Rerank(self, request: Any, context: Any) -> tei_pb2.RerankResponse:
        return await self._unary("rerank", context, lambda: self._rerank(request))

    async def RerankStream(self, requests: AsyncIterator[Any], context: Any) -> Any:
        # Stream in, one answer out: each message may start its forward pass at once.
        return await self._unary(
            "rerank", context, lambda: self._rerank_stream(requests), wait_for_permit=True
        )

    # --- Tokenize -----------------------------------------------------------------------

    async def Tokenize(self, request: Any, context: Any) -> tei_pb2.EncodeResponse:
        return await self._unary("tokenize", context, lambda: self._tokenize(request), infer=False)

    async def TokenizeStream(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        async for response in self._stream(
            "tokenize", requests, context, self._tokenize, infer=False
        ):
            yield response

    async def Decode(self, request: Any, context: Any) -> tei_pb2.DecodeResponse:
        return await self._unary("decode", context, lambda: self._decode(request), infer=False)

    async def DecodeStream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for response in self._stream("decode", requests, context, self._decode, infer=False):
            yield response

    # --- request plumbing ---------------------------------------------------------------

    async def _unary(
        self,
        method: str,
        context: Any,
        work: Callable[[], Awaitable[Response]],
        *,
        infer: bool = True,
        wait_for_permit: bool = False,
    ) -> Response:
        metrics.REQUEST_COUNT.labels(method).inc()
        start = time.perf_counter()
        permitted = False
        try:
            self._admit(context)
            if infer:
                # Unary calls past the limit are refused at once; streams wait (see _feed).
                if self._permits.locked() and not wait_for_permit:
                    raise OverloadedError("Model is overloaded")
                await self._permits.acquire()
                permitted = True
            response = await work()
        except ServingError as err:
            await _fail(context, method, err)
        except Exception as exc:  # noqa: BLE001 - a bug must not leak a traceback
            log.exception("%s failed", method)
            await _fail(context, method, BackendError(f"internal error: {exc}"))
        finally:
            if permitted:
                self._permits.release()
        metrics.REQUEST_SUCCESS.labels(method).inc()
        metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
        return response

    async def _stream(
        self,
        method: str,
        requests: AsyncIterator[Request],
        context: Any,
        work: Callable[[Request], Coroutine[Any, Any, Response]],
        *,
        infer: bool = True,
    ) -> AsyncIterator[Response]:
        """Answer a bidirectional stream in order, with many messages in flight at once."""
        try:
            self._admit(context)
        except ServingError as err:
            await _fail(context, method, err)
        pending: asyncio.Queue[asyncio.Task[Response] | None] = asyncio.Queue()
        feeder = asyncio.create_task(self._feed(method, requests, work, pending, infer))
        try:
            while (task := await pending.get()) is not None:
                start = time.perf_counter()
                try:
                    response = await task
                except ServingError as err:
                    await _fail(context, method, err)
                except Exception as exc:  # noqa: BLE001 - a bug must not leak a traceback
                    log.exception("%s failed", method)
                    await _fail(context, method, BackendError(f"internal error: {exc}"))
                metrics.REQUEST_SUCCESS.labels(method).inc()
                metrics.REQUEST_DURATION.observe(time.perf_counter() - start)
                yield response
            # The requests ended and every one was answered. Did they end in an error?
            await asyncio.wait((feeder,))
            error = None if feeder.cancelled() else feeder.exception()
            if isinstance(error, ServingError):
                await _fail(context, method, error)
            elif error is not None:
                log.error("%s: reading the requests failed: %r", method, error)
                await _fail(context, method, BackendError(f"internal error: {error}"))
        finally:
            feeder.cancel()
            while not pending.empty():
                if (leftover := pending.get_nowait()) is not None:
                    leftover.cancel()

    async def _feed(
        self,
        method: str,
        requests: AsyncIterator[Request],
        work: Callable[[Request], Coroutine[Any, Any, Response]],
        pending: asyncio.Queue[asyncio.Task[Response] | None],
        infer: bool,
    ) -> None:
        try:
            async for request in requests:
                metrics.REQUEST_COUNT.labels(method).inc()
                if infer:
                    await self._permits.acquire()
                task = asyncio.create_task(work(request))
                if infer:
                    # A callback, not a `finally`: it runs even for a task cancelled unstarted.
                    task.add_done_callback(self._release_permit)
                pending.put_nowait(task)
        finally:
            pending.put_nowait(None)

    def _release_permit(self, _: object) -> None:
        self._permits.release()

    def _admit(self, context: Any) -> None:
        if self._bearer is not None:
            sent = dict(context.invocation_metadata()).get("authorization") or ""
            if not hmac.compare_digest(str(sent).encode(), self._bearer.encode()):
                raise UnauthenticatedError("missing or wrong API key")
        self._ready_model()

    async def _infer(self, jobs: Sequence[Job]) -> list[Any]:
        assert self._batcher is not None and self._loop is not None
        futures = []
        for job in jobs:
            job.handle = self._loop.create_future()
            futures.append(job.handle)
        # Requests the event loop reads in one pass reach the queue together (no timer: the
        # hand-over runs as soon as this pass of ready callbacks is done).
        if not self._unsubmitted:
            self._loop.call_soon(self._submit_pending)
        self._unsubmitted.extend(jobs)
        if len(futures) == 1:
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def _submit_pending(self) -> None:
        assert self._batcher is not None
        jobs, self._unsubmitted = self._unsubmitted, []
        self._batcher.submit(jobs)

    def _input(
        self, text: str, pair: str | None, truncate: bool, direction: int, prompt: str | None
    ) -> TextInput:
        """What to tokenize (on a tokenizer worker); empty input is refused at once."""
        if not text or (pair is not None and not pair):
            raise ValidationError("`inputs` cannot be empty")
        return TextInput(
            text, pair, truncate or self.settings.auto_truncate, direction == _LEFT, prompt
        )

    async def _on_tokenizer(self, function: Callable[..., Response], *args: Any) -> Response:
        assert self._batcher is not None
        return await asyncio.wrap_future(self._batcher.run_on_worker(function, *args))

    def _ready_model(self) -> Model:
        if self.model is None:
            raise UnavailableError("model is not ready (loading or shutting down)")
        return self.model

    # --- the work of each RPC -------------------------------------------------------------

    async def _info(self) -> tei_pb2.InfoResponse:
        model = self._ready_model()
        settings = self.settings
        response = tei_pb2.InfoResponse(
            version=__version__,
            model_id=settings.model_id,
            model_dtype=model.dtype,
            model_type=_MODEL_TYPES[model.spec.kind],
            max_concurrent_requests=settings.max_concurrent_requests,
            max_input_length=model.tokenizer.max_input_length,
            max_batch_tokens=settings.max_batch_tokens,
            max_client_batch_size=settings.max_client_batch_size,
            tokenization_workers=settings.tokenization_workers or core_count(),
        )
        if settings.max_batch_requests is not None:
            response.max_batch_requests = settings.max_batch_requests
        if model.sha:
            response.model_sha = model.sha
        return response

    async def _embed(self, request: tei_pb2.EmbedRequest) -> tei_pb2.EmbedResponse:
        start = time.perf_counter_ns()
        model = self._ready_model()
        normalize = request.normalize if request.HasField("normalize") else True
        dimensions = request.dimensions if request.HasField("dimensions") else None
        model.check(Task.POOLED, normalize)
        if dimensions is not None and not 0 < dimensions <= model.output_size:
            raise ValidationError(
                f"`dimensions` must be between 1 and the model's {model.output_size} "
                f"dimensions. Given: {dimensions}"
            )
        prompt = model.tokenizer.prompt(_optional(request, "prompt_name"))
        source = self._input(
            request.inputs, None, request.truncate, request.truncation_direction, prompt
        )
        job = Job(None, Task.POOLED, normalize, dimensions, source=source)
        (vector,) = await self._infer([job])
        response = tei_pb2.EmbedResponse.FromString(packed_floats(vector))
        response.metadata.CopyFrom(_metadata(start, [job]))
        return response

    async def _embed_sparse(
        self, request: tei_pb2.EmbedSparseRequest
    ) -> tei_pb2.EmbedSparseResponse:
        start = time.perf_counter_ns()
        model = self._ready_model()
        model.check(Task.SPARSE)
        prompt = model.tokenizer.prompt(_optional(request, "prompt_name"))
        source = self._input(
            request.inputs, None, request.truncate, request.truncation_direction, prompt
        )
        job = Job(None, Task.SPARSE, source=source)
        ((indices, values),) = await self._infer([job])
        sparse = [
            tei_pb2.SparseValue(index=i, value=v) for i, v in zip(indices, values, strict=True)
        ]
        return tei_pb2.EmbedSparseResponse(
            sparse_embeddings=sparse, metadata=_metadata(start, [job])
        )

    async def _embed_all(self, request: tei_pb2.EmbedAllRequest) -> tei_pb2.EmbedAllResponse:
        start = time.perf_counter_ns()
        model = self._ready_model()
        model.check(Task.ALL)
        prompt = model.tokenizer.prompt(_optional(request, "prompt_name"))
        source = self._input(
            request.inputs, None, request.truncate, request.truncation_direction, prompt
        )
        job = Job(None, Task.ALL, source=source)
        (rows,) = await self._infer([job])
        tokens = [tei_pb2.TokenEmbedding(embeddings=row) for row in rows]
        return tei_pb2.EmbedAllResponse(token_embeddings=tokens, metadata=_metadata(start, [job]))

    async def _predict(self, request: tei_pb2.PredictRequest) -> tei_pb2.PredictResponse:
        return await self._classify(
            request.inputs, None, request.truncate, request.truncation_direction, request.raw_scores
        )

    async def _predict_pair(self, request: tei_pb2.PredictPairRequest) -> tei_pb2.PredictResponse:
        inputs = list(request.inputs)
        if len(inputs) not in (1, 2):
            raise ValidationError(
                f"`inputs` must have a single or two elements. Given: {len(inputs)}"
            )
        pair = inputs[1] if len(inputs) == 2 else None
        return await self._classify(
            inputs[0], pair, request.truncate, request.truncation_direction, request.raw_scores
        )

    async def _classify(
        self, text: str, pair: str | None, truncate: bool, direction: int, raw_scores: bool
    ) -> tei_pb2.PredictResponse:
        start = time.perf_counter_ns()
        model = self._ready_model()
        model.check(Task.SCORES)
        source = self._input(text, pair, truncate, direction, None)
        job = Job(None, Task.SCORES, raw_scores=raw_scores, source=source)
        (scores,) = await self._infer([job])
        ranked = sorted(
            zip(scores, model.spec.labels, strict=True), key=lambda p: p[0], reverse=True
        )
        predictions = [tei_pb2.Prediction(score=score, label=label) for score, label in ranked]
        return tei_pb2.PredictResponse(predictions=predictions, metadata=_metadata(start, [job]))

    async def _rerank(self, request: tei_pb2.RerankRequest) -> tei_pb2.RerankResponse:
        start = time.perf_counter_ns()
        self._reranker()
        texts = list(request.texts)
        if not texts:
            raise ValidationError("`texts` cannot be empty")
        limit = self.settings.max_client_batch_size
        if len(texts) > limit:
            raise ValidationError(f"batch size {len(texts)} > maximum allowed batch size {limit}")
        jobs = [
            Job(
                None,
                Task.SCORES,
                raw_scores=request.raw_scores,
                source=self._input(
                    request.query, text, request.truncate, request.truncation_direction, None
                ),
            )
            for text in texts
        ]
        results = await self._infer(jobs)
        scores = [result[0] for result in results]
        return _rerank_response(scores, texts if request.return_text else None, start, jobs)

    async def _rerank_stream(self, requests: AsyncIterator[Any]) -> tei_pb2.RerankResponse:
        start = time.perf_counter_ns()
        self._reranker()
        jobs: list[Job] = []
        texts: list[str] = []
        waits: list[asyncio.Task[list[Any]]] = []
        first = None
        try:
            async for request in requests:
                if first is None:
                    first = request
                source = self._input(
                    request.query,
                    request.text,
                    request.truncate,
                    request.truncation_direction,
                    None,
                )
                job = Job(None, Task.SCORES, raw_scores=first.raw_scores, source=source)
                jobs.append(job)
                texts.append(request.text)
                waits.append(asyncio.create_task(self._infer([job])))
            if first is None:
                raise ValidationError("`texts` cannot be empty")
            results = await asyncio.gather(*waits)
        finally:
            for wait in waits:
                wait.cancel()
        scores = [result[0][0] for result in results]
        return _rerank_response(scores, texts if first.return_text else None, start, jobs)

    def _reranker(self) -> Model:
        model = self._ready_model()
        if model.spec.kind is not ModelKind.RERANKER:
            kind = model.spec.kind.value
            raise BackendError(f"model is not a re-ranker model (model type: {kind})")
        return model

    async def _tokenize(self, request: tei_pb2.EncodeRequest) -> tei_pb2.EncodeResponse:
        metrics.TOKENIZE_COUNT.inc()
        tokenizer = self._ready_model().tokenizer
        prompt = tokenizer.prompt(_optional(request, "prompt_name"))
        tokens = []
        infos = await self._on_tokenizer(
            tokenizer.tokens, request.inputs, request.add_special_tokens, prompt
        )
        for info in infos:
            token = tei_pb2.SimpleToken(id=info.id, text=info.text, special=info.special)
            if info.start is not None and info.stop is not None:
                token.start, token.stop = info.start, info.stop
            tokens.append(token)
        return tei_pb2.EncodeResponse(tokens=tokens)

    async def _decode(self, request: tei_pb2.DecodeRequest) -> tei_pb2.DecodeResponse:
        metrics.TOKENIZE_COUNT.inc()
        tokenizer = self._ready_model().tokenizer
        text = await self._on_tokenizer(
            tokenizer.decode, list(request.ids), request.skip_special_tokens
        )
        return tei_pb2.DecodeResponse(text=text)


def packed_floats(vector: Any) -> bytes:
    """`repeated float embeddings = 1` of EmbedResponse, encoded from the float32 array
    as protobuf does (tag, length, packed little-endian floats): parsing these bytes
    costs a fraction of building the message from 384 Python floats."""
    data = vector.astype("<f4", copy=False).tobytes()
    size, length = len(data), bytearray()
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return b"\x0a" + bytes(length) + data


def _resolve(jobs: list[Job], results: list[Any] | BaseException) -> None:
    """On the event loop: wake every handler waiting on these jobs."""
    for index, job in enumerate(jobs):
        future = job.handle
        if future.done():  # the caller went away
            continue
        result = results if isinstance(results, BaseException) else results[index]
        if isinstance(result, ServingError):  # this input was refused (tokenization)
            future.set_exception(result)
            continue
        if isinstance(result, BaseException):
            future.set_exception(BackendError(f"inference failed: {result}"))
            continue
        future.set_result(result)
        if job.task is Task.SCORES:
            metrics.PREDICT_COUNT.inc()
        else:
            metrics.EMBED_COUNT.inc()


async def _fail(context: Any, method: str, err: ServingError) -> NoReturn:
    metrics.REQUEST_FAILURE.labels(err.kind).inc()
    if err.kind not in ("validation", "overloaded"):
        log.error("%s: %s", method, err.message)
    await context.abort(err.code, err.message)
    raise AssertionError("unreachable: abort raises")


def _optional(message: Any, field: str) -> str | None:
    return getattr(message, field) if message.HasField(field) else None


def _metadata(start_ns: int, jobs: Sequence[Job]) -> tei_pb2.Metadata:
    """TEI's per-request timings; a multi-input request (rerank) sums its inputs' timings."""
    tokenized_ns = max(job.tokenized_ns for job in jobs)
    queue_ns = sum(job.queue_ns for job in jobs)
    inference_ns = sum(job.inference_ns for job in jobs)
    tokens = sum(job.tokens for job in jobs)
    metrics.TOKENIZATION_DURATION.observe((tokenized_ns - start_ns) / 1e9)
    metrics.QUEUE_DURATION.observe(queue_ns / 1e9)
    metrics.INFERENCE_DURATION.observe(inference_ns / 1e9)
    metrics.INPUT_LENGTH.observe(tokens)
    return tei_pb2.Metadata(
        compute_chars=sum(job.encoded.chars for job in jobs if job.encoded is not None),
        compute_tokens=tokens,
        total_time_ns=time.perf_counter_ns() - start_ns,
        tokenization_time_ns=tokenized_ns - start_ns,
        queue_time_ns=queue_ns,
        inference_time_ns=inference_ns,
    )


def _rerank_response(
    scores: list[float],
    texts: list[str] | None,
    start_ns: int,
    jobs: Sequence[Job],
) -> tei_pb2.RerankResponse:
    ranks = []
    for index, score in sorted(enumerate(scores), key=lambda item: item[1], reverse=True):
        rank = tei_pb2.Rank(index=index, score=score)
        if texts is not None:
            rank.text = texts[index]
        ranks.append(rank)
    return tei_pb2.RerankResponse(ranks=ranks, metadata=_metadata(start_ns, jobs))
