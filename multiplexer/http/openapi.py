"""The OpenAPI document of the HTTP data plane (/openapi.json) and its docs page (/docs).

Request schemas come from the pydantic models; the docs page is Swagger UI, served from
the files of the drf-spectacular-sidecar package (no CDN: it works on a closed network).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic.json_schema import models_json_schema

from multiplexer.http import schemas

if TYPE_CHECKING:
    from multiplexer.http.server import Operation

ASSETS_URL = "/docs/assets"
DOCS_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>TEI Manager: HTTP data plane</title>
  <link rel="stylesheet" href="{ASSETS_URL}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS_URL}/swagger-ui-bundle.js"></script>
  <script>SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
</body>
</html>
"""

_FLOATS = {"type": "array", "items": {"type": "number", "format": "float"}}
_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    "example": {"error": "Model is overloaded", "error_type": "Overloaded"},
}
_OPENAI_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": True},
                "code": {"type": "string", "nullable": True},
            },
        }
    },
}
_TEI_ERRORS = {
    "400": "Empty input",
    "404": "Unknown instance or model",
    "413": "Body over the payload limit",
    "422": "Validation or tokenizer error",
    "424": "The model cannot do this (backend error)",
    "429": "Overloaded: the instance's queue is full (see Retry-After)",
    "503": "The instance is not running or unhealthy",
}
_OPENAI_ERRORS = {
    "400": "Bad request",
    "401": "The instance refused the credentials",
    "404": "Unknown model",
    "413": "Body over the payload limit",
    "429": "Overloaded (see Retry-After)",
    "503": "No running instance",
}
_RESPONSES = {
    "info": {"type": "object", "description": "TEI's Info"},
    "health": None,
    "embed": {"type": "array", "items": _FLOATS},
    "embed_all": {"type": "array", "items": {"type": "array", "items": _FLOATS}},
    "embed_sparse": {
        "type": "array",
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"index": {"type": "integer"}, "value": {"type": "number"}},
            },
        },
    },
    "predict": {"type": "array", "description": "[{score, label}], or a list of them"},
    "rerank": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "index": {"type": "integer"},
                "text": {"type": "string"},
                "score": {"type": "number"},
            },
        },
    },
    "similarity": _FLOATS,
    "tokenize": {"type": "array", "items": {"type": "array", "items": {"type": "object"}}},
    "decode": {"type": "array", "items": {"type": "string"}},
}
_TARGET_PARAMETERS = {
    "/instances/{name}": {"name": "name", "description": "An instance name."},
    "/models/{model_id}": {
        "name": "model_id",
        "description": "A model id (slashes included): its running replicas share the load.",
    },
}


def document(operations: Sequence[Operation]) -> dict[str, Any]:
    return _document(tuple(operations))


@functools.cache
def _document(operations: tuple[Operation, ...]) -> dict[str, Any]:
    _, definitions = models_json_schema(
        [(model, "validation") for model in schemas.REQUEST_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    paths: dict[str, Any] = {}
    for prefix, parameter in _TARGET_PARAMETERS.items():
        path_parameter = {"in": "path", "required": True, "schema": {"type": "string"}}
        path_parameter.update(parameter)
        for operation in operations:
            paths.setdefault(f"{prefix}/{operation.path}", {})[operation.method.lower()] = (
                _operation(operation, path_parameter)
            )
        paths[f"{prefix}/v1/embeddings"] = {
            "post": _op(
                "OpenAI-style embeddings from this target (`model` is ignored)",
                [path_parameter],
                "OpenAIEmbeddingRequest",
                {"$ref": "#/components/schemas/OpenAIEmbeddingResponse"},
                _TEI_ERRORS,
                _ERROR,
            )
        }
        paths[f"{prefix}/invocations"] = {
            "post": _op(
                "By model type: embed (embed_sparse for SPLADE), predict or rerank; also POST "
                f"{prefix}",
                [path_parameter],
                None,
                {},
                _TEI_ERRORS,
                _ERROR,
            )
        }
    paths["/v1/embeddings"] = {
        "post": _op(
            "OpenAI Embeddings API",
            [],
            "OpenAIEmbeddingRequest",
            {"$ref": "#/components/schemas/OpenAIEmbeddingResponse"},
            _OPENAI_ERRORS,
            _OPENAI_ERROR,
        )
    }
    paths["/v1/rerank"] = {
        "post": _op(
            "Rerank (Cohere / Jina shape)",
            [],
            "OpenAIRerankRequest",
            {
                "type": "object",
                "properties": {
                    "model": {"type": "string"},
                    "results": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "index": {"type": "integer"},
                                "relevance_score": {"type": "number"},
                                "document": {
                                    "type": "object",
                                    "properties": {"text": {"type": "string"}},
                                },
                            },
                        },
                    },
                    "usage": {"type": "object"},
                },
            },
            _OPENAI_ERRORS,
            _OPENAI_ERROR,
        )
    }
    paths["/v1/models"] = {
        "get": _op("Routable instances and models", [], None, {"type": "object"}, {}, None)
    }
    paths["/v1/models/{model}"] = {
        "get": _op(
            "One routable instance or model",
            [{"in": "path", "name": "model", "required": True, "schema": {"type": "string"}}],
            None,
            {"type": "object"},
            {"404": "Unknown", "503": "Not running"},
            _OPENAI_ERROR,
        )
    }
    definitions["$defs"]["OpenAIEmbeddingResponse"] = {
        "type": "object",
        "properties": {
            "object": {"type": "string", "example": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "object": {"type": "string", "example": "embedding"},
                        "index": {"type": "integer"},
                        "embedding": {
                            "oneOf": [_FLOATS, {"type": "string", "format": "byte"}],
                        },
                    },
                },
            },
            "model": {"type": "string"},
            "usage": {
                "type": "object",
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
            },
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TEI Manager HTTP data plane",
            "version": "1",
            "description": (
                "Text Embeddings Inference's HTTP API for every instance (`/instances/{name}/`) "
                "and model (`/models/{model_id}/`), and OpenAI-compatible `/v1/embeddings`, "
                "`/v1/models` and `/v1/rerank`. Calls past an instance's "
                "max_concurrent_requests wait in a bounded queue; a full queue answers 429 "
                "with Retry-After."
            ),
        },
        "paths": paths,
        "components": {"schemas": definitions["$defs"]},
    }


def _operation(operation: Operation, parameter: dict[str, Any]) -> dict[str, Any]:
    body = operation.body.__name__ if operation.body is not None else None
    return _op(
        operation.summary,
        [parameter],
        body,
        _RESPONSES.get(operation.path),
        _TEI_ERRORS,
        _ERROR,
    )


def _op(
    summary: str,
    parameters: list[dict[str, Any]],
    body: str | None,
    response: dict[str, Any] | None,
    errors: dict[str, str],
    error_schema: dict[str, Any] | None,
) -> dict[str, Any]:
    ok: dict[str, Any] = {"description": "OK"}
    if response is not None:
        ok["content"] = {"application/json": {"schema": response}}
    responses: dict[str, Any] = {"200": ok}
    for status, description in errors.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": error_schema or {}}},
        }
    spec: dict[str, Any] = {"summary": summary, "parameters": parameters, "responses": responses}
    if body is not None:
        spec["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    return spec


def swagger_ui_dir() -> Path:
    import drf_spectacular_sidecar

    return (
        Path(drf_spectacular_sidecar.__file__).parent
        / "static/drf_spectacular_sidecar/swagger-ui-dist"
    )
