"""`/metrics`: this process's django-prometheus series, every process's series from
PROMETHEUS_MULTIPROC_DIR (gunicorn workers, the multiplexer), and the `tei_manager_*`
series read from the database at scrape time, so they are right whichever process
changed the state. GPU gauges come from NVML where there is a GPU."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from django.conf import settings
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from instances import gpu
from instances.models import Counter, Heartbeat, Instance, Status


def render() -> tuple[bytes, str]:
    collectors: list[Any] = [InstanceCollector()]
    if settings.TEI.prometheus_multiproc_dir:
        multiprocess = CollectorRegistry()
        MultiProcessCollector(multiprocess, path=settings.TEI.prometheus_multiproc_dir)
        collectors.append(multiprocess)
    else:
        collectors.append(REGISTRY)
    return generate_latest(_Union(collectors)), CONTENT_TYPE_LATEST  # type: ignore[arg-type]


class InstanceCollector:
    def collect(self) -> Iterator[Metric]:
        rows = list(
            Instance.objects.values_list(
                "name", "status", "restarts", "health_check_failures_total"
            )
        )
        yield _counter("instances_created", "Instances created.", Counter.get("instances_created"))
        yield _counter("instances_deleted", "Instances deleted.", Counter.get("instances_deleted"))

        failures = CounterMetricFamily(
            "tei_manager_health_check_failures", "Failed health checks.", labels=["instance"]
        )
        restarts = CounterMetricFamily(
            "tei_manager_instance_restarts", "Instance process restarts.", labels=["instance"]
        )
        for name, _, restart_count, failure_count in rows:
            failures.add_metric([name], failure_count)
            restarts.add_metric([name], restart_count)
        yield failures
        yield restarts

        yield GaugeMetricFamily("tei_manager_instances_count", "Instances.", value=len(rows))
        by_status = GaugeMetricFamily(
            "tei_manager_instances_by_status", "Instances per observed status.", labels=["status"]
        )
        for status in Status.values:
            by_status.add_metric([status], sum(1 for row in rows if row[1] == status))
        yield by_status

        beats = GaugeMetricFamily(
            "tei_manager_heartbeat_timestamp_seconds",
            "Last sign of life of a background process.",
            labels=["process"],
        )
        for name, seen in Heartbeat.objects.values_list("name", "last_seen"):
            beats.add_metric([name], seen.timestamp())
        yield beats
        yield from _gpu_metrics()


def _gpu_metrics() -> Iterator[Metric]:
    gpus = gpu.stats()
    if not gpus:
        return
    labels = ["gpu", "name"]
    used = GaugeMetricFamily("tei_manager_gpu_memory_used_bytes", "GPU memory used.", labels=labels)
    total = GaugeMetricFamily("tei_manager_gpu_memory_total_bytes", "GPU memory.", labels=labels)
    utilization = GaugeMetricFamily(
        "tei_manager_gpu_utilization_percent", "GPU utilisation.", labels=labels
    )
    for stats in gpus:
        key = [str(stats.index), stats.name]
        used.add_metric(key, stats.memory_used_bytes)
        total.add_metric(key, stats.memory_total_bytes)
        utilization.add_metric(key, stats.utilization_percent)
    yield from (used, total, utilization)


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"tei_manager_{name}", documentation, value=value)


class _Union:
    def __init__(self, collectors: Iterable[Any]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()
