"""OpenAI-compatible routes: /v1/embeddings, /v1/models, /v1/rerank (Cohere/Jina shape).

`model` is an instance name or a model id, routed by the gRPC rules: a name that names an
instance is that instance, anything else a model id (its running replicas share the load).
/v1/models lists only what the request's key may use.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import numpy as np

from multiplexer.http import schemas
from multiplexer.http.errors import HttpError
from multiplexer.http.tei import Answer, Call, Header, TeiApi, timing, vector
from multiplexer.keys import KeyEntry
from multiplexer.routing import RoutingTable
from multiplexer.wire import Target

OWNER = "tei-manager"


def resolve(table: RoutingTable, model: str) -> Target:
    if not model:
        raise HttpError("Validation", "`model` is required", param="model", status=400)
    if model in table.by_name:
        return Target(instance_name=model)
    return Target(model_id=model)


class OpenAIApi:
    def __init__(self, tei: TeiApi) -> None:
        self.tei = tei

    def start(
        self, model: str | None, grant: KeyEntry | None, metadata: Sequence[Header] = ()
    ) -> Call:
        return self.tei.start(resolve(self.tei.router.table, model or ""), grant, metadata)

    async def embeddings(
        self, call: Call, body: schemas.OpenAIEmbeddingRequest, model: str
    ) -> Answer:
        replies = await self.tei.embed_inputs(call, body.input, "input", body.dimensions)
        encode = _base64 if body.encoding_format == "base64" else _float
        data = [
            {"object": "embedding", "index": index, "embedding": encode(vector(reply))}
            for index, reply in enumerate(replies)
        ]
        tokens = sum(reply.metadata.compute_tokens for reply in replies)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        body_out = {"object": "list", "data": data, "model": model, "usage": usage}
        return Answer(body_out, timing(call, replies))

    def models(self, grant: KeyEntry | None = None) -> Answer:
        """Every running instance, and every model with a running replica, that the key
        (`grant`, None: any) may use: a model counts when it matches the key's targets or
        one of its running replicas does."""
        table = self.tei.router.table
        running = [r for r in table.running if grant is None or grant.may_use(r)]
        names = [route.name for route in running]
        model_ids = sorted({route.model_id for route in running})
        data = [_model(name) for name in names] + [_model(model_id) for model_id in model_ids]
        return Answer({"object": "list", "data": data})

    def model(self, model: str, grant: KeyEntry | None = None) -> Answer:
        table = self.tei.router.table
        target = resolve(table, model)
        # NOT_FOUND / UNAVAILABLE when not routable, PERMISSION_DENIED when not the key's.
        if grant is None:
            table.candidates(target)
        else:
            grant.candidates(table, target)
        return Answer(_model(model))

    async def rerank(self, call: Call, body: schemas.OpenAIRerankRequest) -> Answer:
        documents = [d if isinstance(d, str) else d.text for d in body.documents]
        reply = await self.tei.rerank_texts(call, body.query, documents, field="documents")
        ranks = list(reply.ranks)[: body.top_n]
        results: list[dict[str, Any]] = []
        for rank in ranks:
            result: dict[str, Any] = {"index": rank.index, "relevance_score": rank.score}
            if body.return_documents:
                result["document"] = {"text": documents[rank.index]}
            results.append(result)
        tokens = reply.metadata.compute_tokens
        return Answer(
            {"model": body.model, "results": results, "usage": {"total_tokens": tokens}},
            timing(call, [reply]),
        )


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def _float(vector: np.ndarray) -> np.ndarray:
    return vector


def _base64(vector: np.ndarray) -> str:
    return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
