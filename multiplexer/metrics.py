"""Prometheus metrics of the multiplexer: requests, errors by status code, latency, for gRPC
(by instance and method) and HTTP (by instance, route and status); admission queue depth,
wait and refusals (by instance); the traffic roll-up's own cost. Every call also goes to
the in-memory traffic windows (multiplexer/traffic.py) that the admin's charts come from.

Served on a port of their own (TEI_MANAGER_MULTIPLEXER_METRICS_PORT, 9002 by default, 0
turns it off); when PROMETHEUS_MULTIPROC_DIR is set they are also written there, so the
control plane's /metrics scrape carries them too. Calls that could not be routed count
under instance "-".
"""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from multiplexer.traffic import Traffic

UNROUTED = "-"

REQUESTS = Counter(
    "tei_manager_multiplexer_requests_total",
    "Calls handled by the gRPC multiplexer.",
    ["instance", "method"],
)
ERRORS = Counter(
    "tei_manager_multiplexer_errors_total",
    "Calls that ended with a status other than OK, by status code.",
    ["instance", "method", "code"],
)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY = Histogram(
    "tei_manager_multiplexer_request_duration_seconds",
    "Time from a call's arrival to its last response.",
    ["instance", "method"],
    buckets=BUCKETS,
)
HTTP_REQUESTS = Counter(
    "tei_manager_multiplexer_http_requests_total",
    "HTTP requests handled by the multiplexer, by route and response status.",
    ["instance", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "tei_manager_multiplexer_http_request_duration_seconds",
    "Time from an HTTP request's arrival to its response.",
    ["instance", "route"],
    buckets=BUCKETS,
)
COLD_STARTS = Counter(
    "tei_manager_on_demand_cold_starts_total",
    "Instances of on-demand models started for a call that found none running.",
    ["model"],
)
COLD_START_SECONDS = Histogram(
    "tei_manager_on_demand_cold_start_seconds",
    "Time from a cold call's arrival to its instance running.",
    ["model"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
)
QUEUE_DEPTH = Gauge(
    "tei_manager_multiplexer_queue_depth",
    "Calls waiting in an instance's admission queue.",
    ["instance"],
    multiprocess_mode="livesum",
)
QUEUE_WAIT = Histogram(
    "tei_manager_multiplexer_queue_wait_seconds",
    "Time a call waited in its instance's admission queue (calls admitted at once are not "
    "observed).",
    ["instance"],
    buckets=BUCKETS,
)
QUEUE_REFUSED = Counter(
    "tei_manager_multiplexer_queue_refused_total",
    "Calls refused by admission: the queue was full, or the call's deadline passed in it.",
    ["instance", "reason"],
)

TOKENS = Counter(
    "tei_manager_multiplexer_tokens_total",
    "Tokens the instances reported computing (tei.v1 Metadata.compute_tokens), gRPC and HTTP; "
    "added once per traffic roll-up (every 10 s), not per call.",
    ["instance"],
)
ROLLUP_DURATION = Histogram(
    "tei_manager_multiplexer_rollup_duration_seconds",
    "Time one traffic roll-up took: collecting the windows and writing their rows.",
    buckets=BUCKETS,
)
ROLLUP_ROWS = Counter(
    "tei_manager_multiplexer_rollup_rows_total",
    "Traffic samples written by the roll-up (one per instance per window).",
)


class CallMetrics:
    """Caches the labelled children: a label lookup takes a lock, a cached child does not."""

    def __init__(self, traffic: Traffic | None = None) -> None:
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self.traffic = traffic if traffic is not None else Traffic()

    def observe(
        self, instance: str, method: str, code: grpc.StatusCode, seconds: float, tokens: int = 0
    ) -> None:
        key = (instance, method)
        children = self._children.get(key)
        if children is None:
            children = (REQUESTS.labels(*key), LATENCY.labels(*key))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        failed = code is not grpc.StatusCode.OK
        if failed:
            ERRORS.labels(instance, method, code.name).inc()
        self.traffic.record(instance, failed, seconds, tokens)


class HttpMetrics:
    """Per-route HTTP series; children cached like CallMetrics'. A status of 400 or more
    counts as an error in the traffic windows."""

    def __init__(self, traffic: Traffic | None = None) -> None:
        self._latency: dict[tuple[str, str], Histogram] = {}
        self.traffic = traffic if traffic is not None else Traffic()

    def observe(
        self, instance: str, route: str, status: int, seconds: float, tokens: int = 0
    ) -> None:
        key = (instance, route)
        latency = self._latency.get(key)
        if latency is None:
            latency = self._latency[key] = HTTP_LATENCY.labels(*key)
        latency.observe(seconds)
        HTTP_REQUESTS.labels(instance, route, str(status)).inc()
        self.traffic.record(instance, status >= 400, seconds, tokens)


def queue_depth(instance: str, depth: int) -> None:
    QUEUE_DEPTH.labels(instance).set(depth)


def queue_wait(instance: str, seconds: float) -> None:
    QUEUE_WAIT.labels(instance).observe(seconds)


def refused(instance: str, reason: str) -> None:
    QUEUE_REFUSED.labels(instance, reason).inc()


def tokens_reported(instance: str, tokens: int) -> None:
    TOKENS.labels(instance).inc(tokens)


def rollup_done(seconds: float, rows: int) -> None:
    ROLLUP_DURATION.observe(seconds)
    ROLLUP_ROWS.inc(rows)


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Expose the default registry on http://host:port/metrics (port 0: not at all)."""
    if port:
        start_http_server(port, addr=host)
