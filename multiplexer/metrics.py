"""Prometheus metrics of the multiplexer: requests, errors by status code, latency.

Labelled by instance and method. Served on a port of their own
(TEI_MANAGER_MULTIPLEXER_METRICS_PORT, 9002 by default, 0 turns it off); when
PROMETHEUS_MULTIPROC_DIR is set they are also written there, so the control plane's
/metrics scrape carries them too. Calls that could not be routed count under instance "-".
"""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Histogram, start_http_server

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
LATENCY = Histogram(
    "tei_manager_multiplexer_request_duration_seconds",
    "Time from a call's arrival to its last response.",
    ["instance", "method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


class CallMetrics:
    """Caches the labelled children: a label lookup takes a lock, a cached child does not."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}

    def observe(self, instance: str, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (instance, method)
        children = self._children.get(key)
        if children is None:
            children = (REQUESTS.labels(*key), LATENCY.labels(*key))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if code is not grpc.StatusCode.OK:
            ERRORS.labels(instance, method, code.name).inc()


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:
    """Expose the default registry on http://host:port/metrics (port 0: not at all)."""
    if port:
        start_http_server(port, addr=host)
