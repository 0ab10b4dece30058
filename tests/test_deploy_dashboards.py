"""deploy/grafana/tei-manager.json and deploy/prometheus/prometheus.yml: every query of the
dashboard names only series this project exports, as its real registries list them (the
multiplexer's, the control plane's collector, with a fake GPU so that NVML's gauges show),
and the scrape example points at the ports the configuration gives."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.core import Metric

import multiplexer.metrics  # noqa: F401  (registers the data plane's series)
from instances.metrics import InstanceCollector
from instances.models import Instance
from teimanager.config import Config
from tests.conftest import ROOT
from tests.fake_nvml import use_fake_gpus

DASHBOARD = ROOT / "deploy" / "grafana" / "tei-manager.json"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch, db: None) -> set[str]:
    """Every sample name the project's registries can produce."""
    use_fake_gpus(monkeypatch, [("NVIDIA H100 80GB HBM3", 3 * 2**30, 80 * 2**30, 40)])
    Instance.objects.create(name="a", model_id="m", port=1, prometheus_port=2)
    names: set[str] = set()
    for family in [*REGISTRY.collect(), *InstanceCollector().collect()]:
        names |= sample_names(family)
    return names


def sample_names(family: Metric) -> set[str]:
    suffixes = SUFFIXES.get(family.type, ("",))
    return {family.name + suffix for suffix in suffixes} | {s.name for s in family.samples}


def series_in(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, labels or keywords)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = re.findall(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", expr)
    return {name for name in names if name.lower() not in KEYWORDS}


def queries(node: Any) -> Iterator[str]:
    """Every `expr` of the dashboard's panels (rows included) and its variables' metrics."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"]
        definition = node.get("definition")
        if isinstance(definition, str) and definition.startswith("label_values("):
            yield definition.removeprefix("label_values(").split(",")[0]
        for value in node.values():
            yield from queries(value)
    elif isinstance(node, list):
        for item in node:
            yield from queries(item)


def test_the_query_parser_finds_metric_names_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (instance, le) (rate(x_bucket{instance=~"$instance", '
        'le!="+Inf"}[$__rate_interval]))) / on(instance) y_total + time() - z offset 5m'
    )
    assert series_in(expr) == {"x_bucket", "y_total", "z"}
    assert series_in("sum(rate(tei_manager_nope_total[5m]))") == {"tei_manager_nope_total"}


def test_every_dashboard_query_names_a_series_the_project_exports(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = list(queries(dashboard))
    assert len(found) > 20
    unknown = {}
    for expr in found:
        names = series_in(expr)
        assert names, f"no series in {expr!r}"
        missing = names - exported
        if missing:
            unknown[expr] = sorted(missing)
    assert not unknown, json.dumps(unknown, indent=2)
    assert "tei_manager_nope_total" not in exported


def test_the_dashboard_covers_traffic_latency_queue_errors_restarts_and_gpu_memory() -> None:
    read = set().union(*(series_in(e) for e in queries(json.loads(DASHBOARD.read_text()))))
    for series in (
        "tei_manager_multiplexer_requests_total",
        "tei_manager_multiplexer_http_requests_total",
        "tei_manager_multiplexer_request_duration_seconds_bucket",
        "tei_manager_multiplexer_errors_total",
        "tei_manager_multiplexer_queue_depth",
        "tei_manager_multiplexer_tokens_total",
        "tei_manager_instance_restarts_total",
        "tei_manager_gpu_memory_used_bytes",
    ):
        assert series in read, series


def test_the_scrape_example_reads_the_configured_ports_and_keeps_the_instance_label() -> None:
    config = yaml.safe_load(SCRAPE.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    defaults = Config()
    ports = {
        "tei-manager": defaults.api_port,
        "tei-manager-multiplexer": defaults.multiplexer_metrics_port,
    }
    for name, port in ports.items():
        job = jobs[name]
        assert job["honor_labels"] is True
        assert job["metrics_path"] == "/metrics"
        [target] = job["static_configs"][0]["targets"]
        assert target.endswith(f":{port}")
