"""The OpenAPI schema promises what the API does: every error response is documented as
the envelope, create fields carry their constraints, and Swagger UI needs no CDN."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytestmark = pytest.mark.django_db

UNSAFE = {"post", "put", "patch", "delete"}


@pytest.fixture
def schema(api: Any) -> dict[str, Any]:
    response = api.get("/api/schema", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200
    return dict(response.json())


def test_every_operation_documents_its_errors_as_the_envelope(schema: dict[str, Any]) -> None:
    envelope = schema["components"]["schemas"]["Error"]
    assert set(envelope["required"]) == {"error", "code", "timestamp"}
    operations = [
        (method, path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
    ]
    assert len(operations) == 19
    for method, path, operation in operations:
        responses = operation["responses"]
        expected = {"400", "405", "500"} | ({"403"} if method in UNSAFE else set())
        # Behind a key (protected mode), every operation but /health.
        expected |= {"401", "403"} if path != "/health" else set()
        expected |= {"404"} if "{name}" in path or "{model_id}" in path else set()
        assert expected <= set(responses), (method, path, sorted(responses))
        for status, response in responses.items():
            if (path, status) == ("/health", "503"):
                continue  # the verdict itself, in /health's own shape (checked below)
            if int(status) >= 400:
                content = response["content"]["application/json"]["schema"]
                assert content == {"$ref": "#/components/schemas/Error"}, (method, path, status)
                assert "Error codes: " in response["description"]
    health = schema["paths"]["/health"]["get"]["responses"]
    assert health["503"]["content"] == health["200"]["content"]
    create = schema["paths"]["/instances"]["post"]["responses"]
    assert {"409", "413", "415", "422"} <= set(create)
    assert "CROSS_ORIGIN_REQUEST" in create["403"]["description"]
    assert "PORT_CONFLICT" in create["422"]["description"]
    assert "FORBIDDEN" in create["403"]["description"]
    assert "UNAUTHORIZED" in create["401"]["description"]
    assert {"401", "403"}.isdisjoint(health)
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKey"] == {**schemes["apiKey"], "type": "http", "scheme": "bearer"}


def test_create_fields_carry_their_constraints(schema: dict[str, Any]) -> None:
    create = schema["components"]["schemas"]["InstanceCreate"]
    fields = create["properties"]
    assert create["additionalProperties"] is False
    name = re.compile(fields["name"]["pattern"])
    assert name.fullmatch("bge-small_1") and not name.fullmatch("-flag")
    assert (fields["name"]["minLength"], fields["name"]["maxLength"]) == (1, 64)
    for port in ("port", "prometheus_port"):
        assert (fields[port]["minimum"], fields[port]["maximum"]) == (1024, 65535)
    assert (fields["gpu_id"]["minimum"], fields["gpu_id"]["maximum"]) == (0, 2**31 - 1)
    assert fields["model_id"]["pattern"].startswith("^[^")


def test_the_instance_pooling_enum_includes_the_models_own(schema: dict[str, Any]) -> None:
    pooling = schema["components"]["schemas"]["Instance"]["properties"]["pooling"]
    components = schema["components"]["schemas"]
    values = {
        value
        for ref in pooling.get("oneOf", pooling.get("allOf", []))
        for value in components[ref["$ref"].rsplit("/", 1)[1]]["enum"]
    }
    assert values == {"", "cls", "mean", "splade", "last-token"}


def test_swagger_ui_loads_nothing_from_elsewhere(api: Any) -> None:
    page = api.get("/api/docs").content.decode()
    urls = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert any(url.endswith("swagger-ui-bundle.js") for url in urls), urls
    assert all(url.startswith("/static/drf_spectacular_sidecar/") for url in urls), urls
    assert "cdn" not in page.lower()
