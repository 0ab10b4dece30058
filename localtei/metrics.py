"""Prometheus metrics under TEI's `te_` names (prometheus_client adds `_total` to counters)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

disable_created_metrics()

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)

REQUEST_COUNT = Counter("te_request_count", "Requests received", ["method"])
REQUEST_SUCCESS = Counter("te_request_success", "Requests answered", ["method"])
REQUEST_FAILURE = Counter("te_request_failure", "Requests failed", ["err"])
REQUEST_DURATION = Histogram("te_request_duration", "Request duration (s)", buckets=_SECONDS)
TOKENIZATION_DURATION = Histogram(
    "te_request_tokenization_duration", "Tokenization duration (s)", buckets=_SECONDS
)
QUEUE_DURATION = Histogram("te_request_queue_duration", "Time in the queue (s)", buckets=_SECONDS)
INFERENCE_DURATION = Histogram(
    "te_request_inference_duration", "Inference duration per request (s)", buckets=_SECONDS
)
INPUT_LENGTH = Histogram("te_request_input_length", "Input length (tokens)", buckets=_TOKENS)
EMBED_COUNT = Counter("te_embed_count", "Inputs embedded (dense, sparse or all tokens)")
PREDICT_COUNT = Counter("te_predict_count", "Inputs classified or reranked")
TOKENIZE_COUNT = Counter("te_tokenize_count", "Tokenize and decode requests")

QUEUE_SIZE = Gauge("te_queue_size", "Inputs waiting for a batch")
BATCH_NEXT_SIZE = Histogram("te_batch_next_size", "Inputs per batch", buckets=_SIZES)
BATCH_NEXT_TOKENS = Histogram("te_batch_next_tokens", "Tokens per batch", buckets=_TOKENS)
BATCH_INFERENCE_DURATION = Histogram(
    "te_batch_inference_duration", "Forward pass duration (s)", buckets=_SECONDS
)
BATCH_INFERENCE_COUNT = Counter("te_batch_inference_count", "Batches run")
BATCH_INFERENCE_SUCCESS = Counter("te_batch_inference_success", "Batches that succeeded")


def serve_metrics(port: int, host: str) -> None:
    """Expose /metrics on `host:port` from a daemon thread."""
    start_http_server(port, addr=host)
