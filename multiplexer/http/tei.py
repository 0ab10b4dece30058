"""TEI's HTTP API over the instances' gRPC: one request in, one `tei.v1` call per input out.

A request is routed once (an instance, or the least loaded replica of a model) and its
inputs go to that instance as one call (one input) or one stream (many, all in flight,
answered in order), each input holding an admission slot while in flight. The answer is
TEI 1.9's JSON with TEI's timing headers, summed or averaged over the inputs as TEI does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from pydantic import ValidationError
from tei.v1 import tei_pb2

from multiplexer.calls import InstanceCalls, Metadata
from multiplexer.channels import ChannelPool
from multiplexer.http import schemas
from multiplexer.http.errors import HttpError, empty, from_validation, too_many
from multiplexer.keys import KeyEntry
from multiplexer.routing import Route, Router
from multiplexer.wire import Target

Reply = TypeVar("Reply", bound=Message)
Body = TypeVar("Body", bound=schemas.Body)

_LEFT = tei_pb2.TRUNCATION_DIRECTION_LEFT
_RIGHT = tei_pb2.TRUNCATION_DIRECTION_RIGHT
_HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_MODEL_TYPES = {
    tei_pb2.MODEL_TYPE_EMBEDDING: "embedding",
    tei_pb2.MODEL_TYPE_CLASSIFIER: "classifier",
    tei_pb2.MODEL_TYPE_RERANKER: "reranker",
}


@dataclass(frozen=True)
class Rpc:
    """A `tei.v1` method pair: the unary call for one input, the stream for many."""

    unary: str
    stream: str
    reply: type[Message]


EMBED = Rpc("/tei.v1.Embed/Embed", "/tei.v1.Embed/EmbedStream", tei_pb2.EmbedResponse)
EMBED_SPARSE = Rpc(
    "/tei.v1.Embed/EmbedSparse", "/tei.v1.Embed/EmbedSparseStream", tei_pb2.EmbedSparseResponse
)
EMBED_ALL = Rpc("/tei.v1.Embed/EmbedAll", "/tei.v1.Embed/EmbedAllStream", tei_pb2.EmbedAllResponse)
PREDICT = Rpc(
    "/tei.v1.Predict/PredictPair", "/tei.v1.Predict/PredictPairStream", tei_pb2.PredictResponse
)
TOKENIZE = Rpc(
    "/tei.v1.Tokenize/Tokenize", "/tei.v1.Tokenize/TokenizeStream", tei_pb2.EncodeResponse
)
DECODE = Rpc("/tei.v1.Tokenize/Decode", "/tei.v1.Tokenize/DecodeStream", tei_pb2.DecodeResponse)
RERANK_STREAM = "/tei.v1.Rerank/RerankStream"
INFO = "/tei.v1.Info/Info"


@dataclass
class Answer:
    """What a handler returns: the JSON-able body (numpy arrays allowed) and headers."""

    body: Any
    headers: dict[str, str] | None = None


Header = tuple[str, str | bytes]  # one metadata pair


class Call:
    """One HTTP request's work: its route, its deadline, the metadata its calls to the
    instance carry (trace context, the request id and the instance's own key; never the
    client's credentials), and the tokens the instance reported (for the traffic windows)."""

    def __init__(self, route: Route, timeout: float, metadata: Metadata) -> None:
        self.route = route
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + timeout
        self.metadata = metadata
        self.tokens = 0

    @property
    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HttpError("Backend", "the request ran out of time", status=504, code="timeout")
        return left


class TeiApi:
    """The handlers' logic, without aiohttp: each method takes a parsed body and a Call."""

    def __init__(
        self,
        router: Router,
        pool: ChannelPool,
        request_timeout: float = 30.0,
        max_client_batch_size: int = 2048,
    ) -> None:
        self.router = router
        self.pool = pool
        self.calls = InstanceCalls(router, pool)
        self.request_timeout = request_timeout
        self.max_client_batch_size = max_client_batch_size
        self._info: dict[str, tuple[Route, tei_pb2.InfoResponse]] = {}

    def start(
        self, target: Target, grant: KeyEntry | None = None, metadata: Sequence[Header] = ()
    ) -> Call:
        """Route the request to what its key (`grant`, None: any) may use (RoutingError
        or KeyRefusal when it cannot be) and start its clock; its calls carry `metadata`
        and the instance's own key."""
        route = self.router.choose(target, grant)
        return Call(route, self.request_timeout, (*metadata, *route.credentials) or None)

    # Routes ---------------------------------------------------------------------------

    async def embed(self, call: Call, body: schemas.EmbedRequest) -> Answer:
        texts = await self._texts(call, body.inputs, "inputs")
        common = _embed_options(body.truncate, body.truncation_direction, body.prompt_name)
        requests = [
            tei_pb2.EmbedRequest(
                inputs=text, normalize=body.normalize, dimensions=body.dimensions, **common
            )
            for text in texts
        ]
        replies = await self.run(call, EMBED, requests)
        return Answer([vector(reply) for reply in replies], timing(call, replies))

    async def embed_sparse(self, call: Call, body: schemas.EmbedSparseRequest) -> Answer:
        texts = await self._texts(call, body.inputs, "inputs")
        common = _embed_options(body.truncate, body.truncation_direction, body.prompt_name)
        requests = [tei_pb2.EmbedSparseRequest(inputs=text, **common) for text in texts]
        replies = await self.run(call, EMBED_SPARSE, requests)
        sparse = [
            [{"index": item.index, "value": item.value} for item in reply.sparse_embeddings]
            for reply in replies
        ]
        return Answer(sparse, timing(call, replies))

    async def embed_all(self, call: Call, body: schemas.EmbedAllRequest) -> Answer:
        texts = await self._texts(call, body.inputs, "inputs")
        common = _embed_options(body.truncate, body.truncation_direction, body.prompt_name)
        requests = [tei_pb2.EmbedAllRequest(inputs=text, **common) for text in texts]
        replies = await self.run(call, EMBED_ALL, requests)
        tokens = [
            np.asarray([token.embeddings for token in reply.token_embeddings], dtype=np.float32)
            for reply in replies
        ]
        return Answer(tokens, timing(call, replies))

    async def predict(self, call: Call, body: schemas.PredictRequest) -> Answer:
        single, sequences = _predict_inputs(body.inputs)
        self._check_batch(len(sequences), "inputs")
        requests = [
            tei_pb2.PredictPairRequest(
                inputs=sequence,
                truncate=bool(body.truncate),
                truncation_direction=_direction(body.truncation_direction),
                raw_scores=body.raw_scores,
            )
            for sequence in sequences
        ]
        replies = await self.run(call, PREDICT, requests)
        predictions = [
            [{"score": p.score, "label": p.label} for p in reply.predictions] for reply in replies
        ]
        return Answer(predictions[0] if single else predictions, timing(call, replies))

    async def rerank(self, call: Call, body: schemas.RerankRequest) -> Answer:
        reply = await self.rerank_texts(
            call,
            body.query,
            body.texts,
            truncate=bool(body.truncate),
            direction=_direction(body.truncation_direction),
            raw_scores=body.raw_scores,
            return_text=body.return_text,
        )
        ranks = [
            {"index": rank.index, "text": rank.text, "score": rank.score}
            if rank.HasField("text")
            else {"index": rank.index, "score": rank.score}
            for rank in reply.ranks
        ]
        return Answer(ranks, timing(call, [reply]))

    async def rerank_texts(
        self,
        call: Call,
        query: str,
        texts: Sequence[str],
        *,
        truncate: bool = False,
        direction: Any = _RIGHT,
        raw_scores: bool = False,
        return_text: bool = False,
        field: str = "texts",
    ) -> tei_pb2.RerankResponse:
        """All texts as one RerankStream: one slot for the call, one answer, best first."""
        if not texts:
            raise empty(field)
        self._check_batch(len(texts), field)
        requests = [
            tei_pb2.RerankStreamRequest(
                query=query,
                text=text,
                truncate=truncate,
                truncation_direction=direction,
                raw_scores=raw_scores,
                return_text=return_text,
            ).SerializeToString()
            for text in texts
        ]
        reply = await self.calls.client_stream(
            call.route, RERANK_STREAM, requests, call.remaining, call.metadata
        )
        return tei_pb2.RerankResponse.FromString(reply)

    async def similarity(self, call: Call, body: schemas.SimilarityRequest) -> Answer:
        sentences = body.inputs.sentences
        if not sentences:
            raise empty("inputs.sentences")
        self._check_batch(len(sentences) + 1, "inputs.sentences")
        parameters = body.parameters or schemas.SimilarityParameters.model_validate({})
        common = _embed_options(
            parameters.truncate, parameters.truncation_direction, parameters.prompt_name
        )
        requests = [
            tei_pb2.EmbedRequest(inputs=text, normalize=False, **common)
            for text in [body.inputs.source_sentence, *sentences]
        ]
        replies = await self.run(call, EMBED, requests)
        vectors = np.stack([vector(reply) for reply in replies]).astype(np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        norms[norms == 0] = 1.0
        scores = (vectors[1:] @ vectors[0]) / (norms[1:] * norms[0])
        return Answer(scores.astype(np.float32), timing(call, replies))

    async def tokenize(self, call: Call, body: schemas.TokenizeRequest) -> Answer:
        texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
        if not texts:
            raise empty("inputs")
        self._check_batch(len(texts), "inputs")
        requests = [
            tei_pb2.EncodeRequest(
                inputs=text,
                add_special_tokens=body.add_special_tokens,
                prompt_name=body.prompt_name,
            )
            for text in texts
        ]
        replies = await self.run(call, TOKENIZE, requests)
        return Answer([[_token(token) for token in reply.tokens] for reply in replies])

    async def decode(self, call: Call, body: schemas.DecodeRequest) -> Answer:
        single = not body.ids or isinstance(body.ids[0], int)
        batch: list[Any] = [body.ids] if single else list(body.ids)
        if not batch:
            raise empty("ids")
        return Answer(await self.decode_ids(call, batch, body.skip_special_tokens, "ids"))

    async def decode_ids(
        self, call: Call, batch: Sequence[Sequence[int]], skip_special_tokens: bool, field: str
    ) -> list[str]:
        self._check_batch(len(batch), field)
        requests = [
            tei_pb2.DecodeRequest(ids=ids, skip_special_tokens=skip_special_tokens) for ids in batch
        ]
        replies = await self.run(call, DECODE, requests)
        return [reply.text for reply in replies]

    async def info(self, call: Call) -> Answer:
        info = await self.instance_info(call)
        return Answer(_info_json(call.route, info, self.max_client_batch_size))

    async def health(self, call: Call) -> Answer:
        try:
            reply = await self.pool.unary_unary(call.route.address, _HEALTH_CHECK)(
                health_pb2.HealthCheckRequest().SerializeToString(),
                timeout=min(call.remaining, 5.0),
                metadata=call.metadata,
            )
            serving = (
                health_pb2.HealthCheckResponse.FromString(reply).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        except grpc.aio.AioRpcError:
            serving = False
        if not serving:
            raise HttpError("Unhealthy", "unhealthy")
        return Answer(None)

    async def invocations(self, call: Call, raw: bytes) -> Answer:
        """What TEI serves on `/` and `/invocations`, by the model's type."""
        info = await self.instance_info(call)
        if info.model_type == tei_pb2.MODEL_TYPE_CLASSIFIER:
            return await self.predict(call, parse(schemas.PredictRequest, raw))
        if info.model_type == tei_pb2.MODEL_TYPE_RERANKER:
            return await self.rerank(call, parse(schemas.RerankRequest, raw))
        if call.route.pooling == "splade":
            return await self.embed_sparse(call, parse(schemas.EmbedSparseRequest, raw))
        return await self.embed(call, parse(schemas.EmbedRequest, raw))

    # Shared ---------------------------------------------------------------------------

    async def run(self, call: Call, rpc: Rpc, requests: Sequence[Message]) -> list[Any]:
        """One call for one request, one stream for many; the replies, in order."""
        payloads = [request.SerializeToString() for request in requests]
        if len(payloads) == 1:
            reply = await self.calls.unary(
                call.route, rpc.unary, payloads[0], call.remaining, call.metadata
            )
            return [rpc.reply.FromString(reply)]
        replies = await self.calls.stream(
            call.route, rpc.stream, payloads, call.remaining, call.metadata
        )
        return [rpc.reply.FromString(reply) for reply in replies]

    async def embed_inputs(
        self, call: Call, inputs: schemas.Inputs, field: str, dimensions: int | None
    ) -> list[Any]:
        """EmbedResponses for `inputs`, normalized, as TEI's OpenAI route makes them."""
        texts = await self._texts(call, inputs, field)
        requests = [
            tei_pb2.EmbedRequest(inputs=text, normalize=True, dimensions=dimensions)
            for text in texts
        ]
        return await self.run(call, EMBED, requests)

    async def instance_info(self, call: Call) -> tei_pb2.InfoResponse:
        """The instance's Info, asked once per routing table row (not per request)."""
        route = call.route
        cached = self._info.get(route.name)
        if cached is not None and cached[0] is route:
            return cached[1]
        reply = await self.pool.unary_unary(route.address, INFO)(
            tei_pb2.InfoRequest().SerializeToString(),
            timeout=call.remaining,
            metadata=call.metadata,
        )
        info = tei_pb2.InfoResponse.FromString(reply)
        self._info[route.name] = (route, info)
        return info

    async def _texts(self, call: Call, inputs: schemas.Inputs, field: str) -> list[str]:
        """The inputs as texts; token ids are decoded by the instance (tei.v1 takes text)."""
        if isinstance(inputs, str):
            return [inputs]
        if not inputs:
            raise empty(field)
        batch: list[Any] = [inputs] if isinstance(inputs[0], int) else list(inputs)
        self._check_batch(len(batch), field)
        ids = [item for item in batch if not isinstance(item, str)]
        if not ids:
            return batch
        decoded = iter(await self.decode_ids(call, ids, True, field))
        return [item if isinstance(item, str) else next(decoded) for item in batch]

    def _check_batch(self, count: int, field: str) -> None:
        if count > self.max_client_batch_size:
            raise too_many(count, self.max_client_batch_size, field)


def parse(model: type[Body], raw: bytes) -> Body:
    try:
        return model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise from_validation(exc) from None


def vector(reply: Any) -> np.ndarray:
    return np.asarray(reply.embeddings, dtype=np.float32)


def timing(call: Call, replies: Sequence[Any]) -> dict[str, str]:
    """TEI's headers: characters and tokens summed, stage times averaged, in ms."""
    count = max(len(replies), 1)
    metadata = [reply.metadata for reply in replies]
    total = str(int((time.perf_counter() - call.started) * 1000))
    call.tokens = sum(m.compute_tokens for m in metadata)

    def mean_ms(field: str) -> str:
        return str(sum(getattr(m, field) for m in metadata) // count // 1_000_000)

    return {
        "x-compute-time": total,
        "x-compute-characters": str(sum(m.compute_chars for m in metadata)),
        "x-compute-tokens": str(call.tokens),
        "x-total-time": total,
        "x-tokenization-time": mean_ms("tokenization_time_ns"),
        "x-queue-time": mean_ms("queue_time_ns"),
        "x-inference-time": mean_ms("inference_time_ns"),
    }


def _embed_options(
    truncate: bool | None, direction: str, prompt_name: str | None
) -> dict[str, Any]:
    # Unset `truncate` is false on the wire: the instance then applies its --auto-truncate.
    return {
        "truncate": bool(truncate),
        "truncation_direction": _direction(direction),
        "prompt_name": prompt_name,
    }


def _direction(direction: str) -> Any:
    return _LEFT if direction.lower() == "left" else _RIGHT


def _predict_inputs(inputs: str | list[str] | list[list[str]]) -> tuple[bool, list[list[str]]]:
    """TEI's forms: "text", ["text"], ["text", "pair"] (one), or [[...], [...]] (a batch)."""
    if isinstance(inputs, str):
        return True, [[inputs]]
    if not inputs:
        raise empty("inputs")
    if isinstance(inputs[0], str):
        sequences = [inputs]
        single = True
    else:
        sequences = inputs  # type: ignore[assignment]
        single = False
    for sequence in sequences:
        if len(sequence) not in (1, 2):
            raise HttpError(
                "Validation",
                "`inputs` must be a string, a pair of strings [string, string] or a batch of "
                f"[string] and [string, string]; got a sequence of {len(sequence)}",
                param="inputs",
            )
    return single, sequences  # type: ignore[return-value]


def _token(token: Any) -> dict[str, Any]:
    return {
        "id": token.id,
        "text": token.text,
        "special": token.special,
        "start": token.start if token.HasField("start") else None,
        "stop": token.stop if token.HasField("stop") else None,
    }


def _info_json(route: Route, info: tei_pb2.InfoResponse, max_client_batch_size: int) -> Any:
    """TEI's /info. The instance's Info has no pooling nor labels: pooling is the instance's
    configured one ("" when the model's own), labels are left empty."""
    kind = _MODEL_TYPES.get(info.model_type, "embedding")
    model_type: dict[str, Any] = (
        {kind: {"pooling": route.pooling}}
        if kind == "embedding"
        else {kind: {"id2label": {}, "label2id": {}}}
    )
    return {
        "model_id": info.model_id,
        "model_sha": info.model_sha if info.HasField("model_sha") else None,
        "model_dtype": info.model_dtype,
        "served_model_name": info.model_id,
        "model_type": model_type,
        "max_concurrent_requests": route.max_concurrent_requests,
        "max_input_length": info.max_input_length,
        "max_batch_tokens": info.max_batch_tokens,
        "max_batch_requests": (
            info.max_batch_requests if info.HasField("max_batch_requests") else None
        ),
        "max_client_batch_size": max_client_batch_size,
        "auto_truncate": route.auto_truncate,
        "tokenization_workers": info.tokenization_workers,
        "version": info.version,
        "sha": info.sha if info.HasField("sha") else None,
        "docker_label": info.docker_label if info.HasField("docker_label") else None,
    }
