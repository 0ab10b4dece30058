"""Schema fuzzing: schemathesis drives the running `web` server (the Procfile's gunicorn,
on a free port, against the test database) from its own /api/schema, with a bounded number
of examples per operation, valid and invalid. No answer may be a 5xx; every answer must be
documented (status, content type, body schema); every error must be the envelope; what the
schema calls invalid must be refused. Operations on one instance run twice: on generated
names (404s) and on an instance (or a model) that exists (the 200s and 409s).

Creates, starts and restarts enqueue Celery tasks, and none of them may start a process:
the server runs as node `fuzz-<session>`, which no worker serves, so its launch messages
wait in that node's own queue (dropped with the session's other queues at the end), and
the rows go with the test's transactional flush. `max_instances = 20` bounds the rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.conftest import SESSION_DIR, SESSION_ID, TEST_CONFIG_FILE, TEST_LOG_DIR
from tests.live_web import LiveWeb

FUZZ_NODE = f"fuzz-{SESSION_ID}"
EXAMPLES_PER_OPERATION = 25
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)


@pytest.fixture(scope="module")
def fuzzed_web(django_db_setup: None) -> Iterator[LiveWeb]:
    config = SESSION_DIR / "fuzz.toml"
    limited = TEST_CONFIG_FILE.read_text().replace("max_instances = 100", "max_instances = 20")
    config.write_text(limited)
    with LiveWeb("fuzz", TEI_MANAGER_NODE=FUZZ_NODE, TEI_MANAGER_CONFIG=str(config)) as web:
        yield web


def error_envelope(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx and 5xx is `{"error", "code", "timestamp"}` and nothing else."""
    if response.status_code < 400:
        return None
    body = json.loads(response.content)
    assert isinstance(body, dict) and set(body) == {"error", "code", "timestamp"}, body
    assert body["error"] and body["code"].isupper() and body["timestamp"].endswith("Z"), body
    return True


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.negative_data_rejection,
    error_envelope,
]


@pytest.mark.django_db(transaction=True)
def test_the_api_answers_fuzzing_as_its_schema_says(fuzzed_web: LiveWeb) -> None:
    schema = schemathesis.openapi.from_url(f"http://127.0.0.1:{fuzzed_web.port}/api/schema")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19
    # /health takes no input; its verdict (200, or 503 while a part is stale, as here where
    # no beat runs) is tests/test_health.py's to check.
    operations = [operation for operation in operations if operation.path != "/health"]
    for index, operation in enumerate(operations):
        for mode in MODES:
            fuzz(operation, mode)
        if "{model_id}" in operation.path:
            model_id = existing_model(fuzzed_web, f"fuzz/model-{index}")
            for mode in MODES:
                fuzz(operation, mode, path_parameters={"model_id": model_id})
        elif operation.path_parameters:
            name = existing_instance(fuzzed_web, f"fuzz-{index}")
            for mode in MODES:
                fuzz(operation, mode, path_parameters={"name": name})
    assert fuzzed_web.process is not None and fuzzed_web.process.poll() is None


def existing_instance(web: LiveWeb, name: str) -> str:
    body = json.dumps({"name": name, "model_id": "org/model"}).encode()
    status, _, reply = web.request("POST", "/instances", body, {"Content-Type": "application/json"})
    assert status == 201, reply
    (TEST_LOG_DIR / f"{name}.log").write_text("".join(f"line {i}\n" for i in range(20)))
    return name


def existing_model(web: LiveWeb, model_id: str) -> str:
    body = json.dumps({"model_id": model_id}).encode()
    status, _, reply = web.request("POST", "/models", body, {"Content-Type": "application/json"})
    assert status == 201, reply
    return model_id


def fuzz(operation: Any, mode: GenerationMode, **fixed: Any) -> None:
    @given(case=operation.as_strategy(generation_mode=mode, **fixed))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def run(case: Any) -> None:
        case.call_and_validate(checks=CHECKS, timeout=10)

    try:
        run()
    except Unsatisfiable:
        # Nothing to make invalid: no parameter, or only a fixed one, and no body.
        assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query
