"""The server's settings, as parsed from text-embeddings-router's flags."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    model_id: str
    revision: str | None = None
    dtype: str | None = None
    pooling: str | None = None
    max_concurrent_requests: int = 512
    max_batch_tokens: int = 16384
    max_batch_requests: int | None = None
    max_client_batch_size: int = 32
    auto_truncate: bool = False
    tokenization_workers: int | None = None
    default_prompt_name: str | None = None
    default_prompt: str | None = None
    hostname: str = "0.0.0.0"
    port: int = 3000
    prometheus_port: int = 9000
    json_output: bool = False
    huggingface_hub_cache: str | None = None
    api_key: str | None = None
    payload_limit: int = 2_000_000
