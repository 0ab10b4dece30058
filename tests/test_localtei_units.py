"""localtei's pieces in-process: flags, model lookup, model description, batching, API."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from instances.launch import ROUTER_FLAGS
from localtei.cli import parse_args
from localtei.errors import StartupError
from localtei.jobs import Job, Task
from localtei.lookup import find_model
from localtei.server import listen_address
from localtei.spec import ModelKind, describe_model
from localtei.tokenization import Encoded
from tests.localtei_fixtures import MINILM_ID, build_hf_cache, minilm_path


def test_flags_default_as_tei_and_fall_back_to_teis_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODEL_ID", "PORT", "AUTO_TRUNCATE", "HOSTNAME", "POOLING", "API_KEY"):
        monkeypatch.delenv(name, raising=False)
    defaults = parse_args([])
    assert (defaults.port, defaults.hostname, defaults.prometheus_port) == (3000, "0.0.0.0", 9000)
    assert (defaults.max_batch_tokens, defaults.max_concurrent_requests) == (16384, 512)
    assert defaults.max_client_batch_size == 32 and not defaults.auto_truncate
    monkeypatch.setenv("MODEL_ID", "some/model")
    monkeypatch.setenv("PORT", "8123")
    monkeypatch.setenv("AUTO_TRUNCATE", "true")
    monkeypatch.setenv("HOSTNAME", "127.0.0.2")
    monkeypatch.setenv("POOLING", "cls")
    monkeypatch.setenv("API_KEY", "k")
    from_env = parse_args([])
    assert (from_env.model_id, from_env.port, from_env.auto_truncate) == ("some/model", 8123, True)
    assert (from_env.hostname, from_env.pooling, from_env.api_key) == ("127.0.0.2", "cls", "k")
    assert parse_args(["--port", "9"]).port == 9  # a flag beats the environment
    assert parse_args(["--hostname", "127.0.0.1"]).hostname == "127.0.0.1"
    assert parse_args(["--auto-truncate", "false"]).auto_truncate is False
    monkeypatch.setenv("AUTO_TRUNCATE", "false")
    assert parse_args([]).auto_truncate is False
    assert parse_args(["--auto-truncate"]).auto_truncate is True


def test_it_listens_where_tei_would(monkeypatch: pytest.MonkeyPatch) -> None:
    # A container's HOSTNAME is its name: TEI does not resolve it, it listens everywhere.
    monkeypatch.setenv("HOSTNAME", "a1b2c3d4e5f6")
    assert listen_address(parse_args([]).hostname) == "0.0.0.0"
    assert listen_address("127.0.0.1") == "127.0.0.1"
    assert listen_address("::1") == "::1"


def test_it_accepts_every_flag_of_the_router() -> None:
    values = {"--dtype": "float32", "--pooling": "mean", "--auto-truncate": "true"}
    for flag in ROUTER_FLAGS:
        if flag in ("--json-output", "--disable-spans"):
            parse_args([flag])
        else:
            parse_args([flag, values.get(flag, "1")])


def test_default_prompt_flags_exclude_each_other() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--default-prompt-name", "a", "--default-prompt", "b"])


def test_lookup_finds_a_directory_the_cache_and_a_package(tmp_path: Path) -> None:
    assert find_model(str(minilm_path())).source == "directory"
    packaged = find_model(MINILM_ID, cache_dir=str(tmp_path / "empty-cache"))
    assert (packaged.source, packaged.path) == ("package", minilm_path())
    cache = build_hf_cache(tmp_path / "cache", "org/cached", minilm_path())
    cached = find_model("org/cached", cache_dir=str(cache))
    assert cached.source == "hf-cache" and cached.sha and (cached.path / "config.json").exists()


def test_lookup_names_every_place_it_tried(tmp_path: Path) -> None:
    with pytest.raises(StartupError) as caught:
        find_model("org/missing", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "'org/missing' not found" in message
    assert "not a local directory" in message and "not a packaged model" in message


def test_the_model_kind_comes_from_architectures_and_labels(tmp_path: Path) -> None:
    def model_with(config: dict[str, object], pooling: str | None = None) -> object:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        return describe_model(directory, pooling)

    classifier = model_with(
        {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}}
    )
    reranker = model_with(
        {"architectures": ["XLMRobertaForSequenceClassification"], "id2label": {"0": "s"}}
    )
    cls_default = model_with({"architectures": ["BertModel"]})
    splade = model_with({"architectures": ["BertForMaskedLM"]}, "splade")
    assert (classifier.kind, classifier.labels) == (ModelKind.CLASSIFIER, ["a", "b"])  # type: ignore[attr-defined]
    assert reranker.kind is ModelKind.RERANKER  # type: ignore[attr-defined]
    assert cls_default.pooling == "cls"  # type: ignore[attr-defined]
    assert splade.is_splade  # type: ignore[attr-defined]
    with pytest.raises(StartupError, match="ForMaskedLM"):
        model_with({"architectures": ["BertModel"]}, "splade")


def test_pooling_and_limit_come_from_the_sentence_transformers_files() -> None:
    spec = describe_model(minilm_path())
    assert (spec.kind, spec.pooling, spec.max_input_length) == (ModelKind.EMBEDDING, "mean", 256)
    assert describe_model(minilm_path(), "cls").pooling == "cls"


def job(tokens: int) -> Job:
    return Job(Encoded(list(range(tokens)), [0] * tokens, tokens), Task.POOLED)


def test_a_batch_fills_until_the_next_input_would_pass_max_batch_tokens() -> None:
    from localtei.batching import take_batch

    queue = deque([job(10), job(10), job(30), job(5)])
    # Padded: 2 x 10 = 20 fits in 40; adding the 30-token input makes 3 x 30 = 90.
    assert [len(j.encoded.ids) for j in take_batch(queue, 40, None)] == [10, 10]
    assert [len(j.encoded.ids) for j in take_batch(queue, 40, None)] == [30]
    assert [len(j.encoded.ids) for j in take_batch(queue, 40, None)] == [5]
    queue = deque(job(4) for _ in range(5))
    assert len(take_batch(queue, 1000, 2)) == 2  # --max-batch-requests
    assert len(take_batch(deque([job(50)]), 10, None)) == 1  # never an empty batch


def test_the_in_process_api_embeds_with_the_servers_code_path() -> None:
    import torch
    from transformers import AutoModel, AutoTokenizer

    from localtei.model import load_model

    texts = ["The in-process API.", "Same vectors as the server."]
    vectors = load_model(MINILM_ID).embed(texts)
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = AutoModel.from_pretrained(str(minilm_path())).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert vectors.shape == (2, 384)
    assert np.allclose(vectors, expected, atol=1e-4)


def test_the_default_prompt_applies_when_the_request_names_none() -> None:
    from localtei.tokenization import TextTokenizer

    tokenizer = TextTokenizer.from_model_dir(
        minilm_path(), 256, prompts={"query": "query: "}, default_prompt="passage: "
    )
    assert tokenizer.prompt(None) == "passage: "
    assert tokenizer.prompt("query") == "query: "
    with_default = tokenizer.encode("x", prompt=tokenizer.prompt(None))
    assert with_default.ids == tokenizer.encode("passage: x").ids
    assert with_default.chars == len("passage: x")
