"""The checked-in generated code matches the .proto files, and the wire format matches TEI's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tei.v1 import tei_pb2
from tei_multiplexer.v1 import multiplexer_pb2

PROTO_DIR = Path(__file__).resolve().parent.parent / "proto"
PROTO_FILES = ["tei/v1/tei.proto", "tei_multiplexer/v1/multiplexer.proto"]


def test_it_keeps_generated_code_current(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            *PROTO_FILES,
        ],
        check=True,
        cwd=PROTO_DIR,
    )
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc generated nothing"
    for relative in generated:
        checked_in = PROTO_DIR / relative
        assert checked_in.exists(), f"{relative} is not checked in: run `make proto`"
        assert checked_in.read_bytes() == (tmp_path / relative).read_bytes(), (
            f"{relative} is stale: run `make proto`"
        )


def _fields(message: type) -> dict[str, tuple[int, bool]]:
    descriptor = message.DESCRIPTOR  # type: ignore[attr-defined]
    return {f.name: (f.number, f.has_presence) for f in descriptor.fields}


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            tei_pb2.EmbedRequest,
            {
                "inputs": 1,
                "truncate": 2,
                "normalize": 3,
                "truncation_direction": 4,
                "prompt_name": 5,
                "dimensions": 6,
            },
        ),
        (
            tei_pb2.InfoResponse,
            {
                "version": 1,
                "sha": 2,
                "docker_label": 3,
                "model_id": 4,
                "model_sha": 5,
                "model_dtype": 6,
                "model_type": 7,
                "max_concurrent_requests": 8,
                "max_input_length": 9,
                "max_batch_tokens": 10,
                "max_batch_requests": 11,
                "max_client_batch_size": 12,
                "tokenization_workers": 13,
            },
        ),
        (
            tei_pb2.RerankStreamRequest,
            {
                "query": 1,
                "text": 2,
                "truncate": 3,
                "raw_scores": 4,
                "return_text": 5,
                "truncation_direction": 6,
            },
        ),
        (tei_pb2.SimpleToken, {"id": 1, "text": 2, "special": 3, "start": 4, "stop": 5}),
        (
            tei_pb2.EmbedSparseRequest,
            {"inputs": 1, "truncate": 2, "truncation_direction": 3, "prompt_name": 4},
        ),
        (
            multiplexer_pb2.EmbedArrowRequest,
            {"target": 1, "arrow_ipc": 2, "truncate": 3, "normalize": 4, "noop": 5},
        ),
        (multiplexer_pb2.Target, {"instance_name": 1, "model_id": 2, "instance_index": 3}),
    ],
)
def test_it_uses_the_documented_field_numbers(message: type, expected: dict[str, int]) -> None:
    assert {name: number for name, (number, _) in _fields(message).items()} == expected


def test_it_marks_the_documented_fields_optional() -> None:
    optional = {name for name, (_, presence) in _fields(tei_pb2.EmbedRequest).items() if presence}
    assert optional == {"normalize", "prompt_name", "dimensions"}
    info_optional = {
        name for name, (_, presence) in _fields(tei_pb2.InfoResponse).items() if presence
    }
    assert info_optional == {"sha", "docker_label", "model_sha", "max_batch_requests"}


def test_it_names_services_like_tei() -> None:
    services = {
        s.name: [m.name for m in s.methods] for s in tei_pb2.DESCRIPTOR.services_by_name.values()
    }
    assert services["Embed"] == [
        "Embed",
        "EmbedStream",
        "EmbedSparse",
        "EmbedSparseStream",
        "EmbedAll",
        "EmbedAllStream",
    ]
    assert set(services) == {"Info", "Embed", "Predict", "Rerank", "Tokenize"}
    assert tei_pb2.DESCRIPTOR.package == "tei.v1"
    assert multiplexer_pb2.DESCRIPTOR.package == "tei_multiplexer.v1"
