"""The traffic time series without a server: the latency histogram, the token scan, the
in-memory windows and the roll-up's rows, and the series the admin draws from them."""

from __future__ import annotations

import random
from typing import Any

import pytest
from prometheus_client import REGISTRY
from tei.v1 import tei_pb2

from multiplexer.rollup import Rollup, samples
from multiplexer.routing import Route, Router, RoutingTable
from multiplexer.traffic import Snapshot, Traffic, response_tokens
from telemetry import histogram, series
from telemetry.models import GpuSample, StatusSample, TrafficSample

NOW = 1_800_000_000.0  # a whole multiple of 300: the 24-hour steps line up with it
FIFTEEN, DAY = series.WINDOWS["15m"], series.WINDOWS["24h"]
TOKENS = "tei_manager_multiplexer_tokens_total"


def route(name: str, status: str = "running") -> Route:
    return Route(name=name, model_id=f"{name}/model", address="127.0.0.1:1", status=status)


def sample(instance: str, at: float, **fields: Any) -> TrafficSample:
    values: dict[str, Any] = {"seconds": 10.0, "source": "a"}
    values.update(fields)
    return TrafficSample.objects.create(instance=instance, at=int(at), **values)


def latencies(*seconds: float) -> dict[str, int]:
    traffic = Traffic()
    for value in seconds:
        traffic.record("x", False, value)
    return {str(k): v for k, v in histogram.sparse(traffic.windows["x"].latency).items()}


# -- histogram ---------------------------------------------------------------------------


def test_quantiles_come_back_within_half_a_bucket() -> None:
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(-4, 1.0) for _ in range(20_000))
    traffic = Traffic()
    for value in values:
        traffic.record("x", False, value)
    counts = histogram.sparse(traffic.windows["x"].latency)
    for q in (0.5, 0.95, 0.99):
        exact = values[int(q * len(values))]
        estimate = histogram.quantile(counts, q)
        assert estimate is not None
        assert abs(estimate - exact) / exact < 0.075, (q, exact, estimate)


def test_merged_histograms_equal_one_histogram_of_everything() -> None:
    first, second = Traffic(), Traffic()
    for index, value in enumerate([0.001, 0.002, 0.05, 0.3, 2.0, 0.0007]):
        (first if index % 2 else second).record("x", False, value)
    both = Traffic()
    for value in [0.001, 0.002, 0.05, 0.3, 2.0, 0.0007]:
        both.record("x", False, value)
    merged = histogram.merge(
        [
            histogram.sparse(first.windows["x"].latency),
            histogram.sparse(second.windows["x"].latency),
        ]
    )
    assert merged == histogram.sparse(both.windows["x"].latency)
    assert histogram.quantile({}, 0.5) is None


def test_latencies_outside_the_buckets_are_still_counted() -> None:
    traffic = Traffic()
    traffic.record("x", False, 0.0)
    traffic.record("x", False, 10_000.0)
    counts = histogram.sparse(traffic.windows["x"].latency)
    assert sum(counts.values()) == 2
    assert min(counts) == 0 and max(counts) == histogram.SIZE - 1


# -- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        tei_pb2.EmbedResponse(embeddings=[0.5] * 384),
        tei_pb2.EmbedSparseResponse(sparse_embeddings=[tei_pb2.SparseValue(index=3, value=1)]),
        tei_pb2.EmbedAllResponse(token_embeddings=[tei_pb2.TokenEmbedding(embeddings=[1.0])] * 9),
        tei_pb2.PredictResponse(predictions=[tei_pb2.Prediction(score=0.1, label="a")]),
        tei_pb2.RerankResponse(ranks=[tei_pb2.Rank(index=1, score=0.5)]),
    ],
)
def test_it_reads_compute_tokens_from_every_kind_of_reply(reply: Any) -> None:
    reply.metadata.CopyFrom(
        tei_pb2.Metadata(compute_chars=70, compute_tokens=300, total_time_ns=5, queue_time_ns=1)
    )
    assert response_tokens(reply.SerializeToString()) == 300


def test_a_reply_without_metadata_or_that_does_not_parse_has_no_tokens() -> None:
    assert response_tokens(tei_pb2.EmbedResponse(embeddings=[1.0]).SerializeToString()) == 0
    assert response_tokens(b"") == 0
    assert response_tokens(b"\x12\x05\x10") == 0  # truncated
    assert response_tokens(b"\x0f\x00") == 0  # wire type 7


# -- windows and the roll-up -------------------------------------------------------------


def test_a_window_counts_calls_errors_tokens_and_starts_again_once_taken() -> None:
    router = Router(RoutingTable.build([route("a")]))
    traffic = Traffic()
    traffic.record("a", False, 0.004, tokens=12)
    traffic.record("a", True, 0.010)
    traffic.record("-", True, 0.0001)
    snapshot = traffic.take(router)
    window = snapshot.windows["a"]
    assert (window.calls, window.errors, window.tokens) == (2, 1, 12)
    assert sum(window.latency) == 2
    assert traffic.take(router).windows == {}


def test_the_roll_up_makes_a_row_per_running_or_called_instance_and_none_for_unrouted() -> None:
    table = RoutingTable.build([route("idle"), route("busy"), route("off", "stopped")])
    traffic = Traffic()
    for _ in range(3):
        traffic.record("busy", False, 0.002, tokens=5)
    traffic.record("-", True, 0.001)
    traffic.record("gone", False, 0.001)  # deleted since: its calls still count
    rows = {row.instance: row for row in samples(traffic.take(Router(table)), table)}
    assert set(rows) == {"idle", "busy", "gone"}
    assert (rows["busy"].calls, rows["busy"].tokens) == (3, 15)
    assert rows["idle"].calls == 0 and rows["idle"].latency == {}


@pytest.mark.django_db
def test_the_roll_up_writes_one_batch_per_window_stamped_with_its_end() -> None:
    table = RoutingTable.build([route("a"), route("b")])
    traffic = Traffic()
    taken: list[Snapshot] = []

    def collect() -> Snapshot:
        taken.append(traffic.take(Router(table)))
        return taken[-1]

    rollup = Rollup(collect, "node-1", interval=10)
    tokens_before = REGISTRY.get_sample_value(TOKENS, {"instance": "a"}) or 0
    for _ in range(40):
        traffic.record("a", False, 0.003, tokens=7)
    assert rollup.run(table, now=NOW + 3.2) == 2
    traffic.record("b", True, 0.5)
    assert rollup.run(table, now=NOW + 13.9) == 2
    rows = list(TrafficSample.objects.order_by("at", "instance").values_list(
        "at", "instance", "source", "calls", "errors"))  # fmt: skip
    assert rows == [
        (NOW, "a", "node-1", 40, 0),
        (NOW, "b", "node-1", 0, 0),
        (NOW + 10, "a", "node-1", 0, 0),
        (NOW + 10, "b", "node-1", 1, 1),
    ]
    assert len(taken) == 2  # one collection per window, whatever the number of calls
    # Prometheus gets the tokens once per window too, not once per call.
    assert REGISTRY.get_sample_value(TOKENS, {"instance": "a"}) == tokens_before + 280


@pytest.mark.django_db
def test_the_roll_up_deletes_samples_older_than_a_day() -> None:
    sample("a", NOW - series.RETENTION_SECS - 10)
    sample("a", NOW - series.RETENTION_SECS + 10)
    table = RoutingTable()
    Rollup(lambda: Traffic().take(Router(table)), "n").run(table, now=NOW)
    assert list(TrafficSample.objects.values_list("at", flat=True)) == [
        NOW - series.RETENTION_SECS + 10
    ]


def test_the_roll_up_is_due_at_each_boundary_only() -> None:
    rollup = Rollup(lambda: Traffic().take(Router()), "n", interval=10)
    rollup._next = NOW + 10
    assert not rollup.due(NOW + 9.9)
    assert rollup.due(NOW + 10.0)
    assert not Rollup(lambda: Traffic().take(Router()), "n", interval=0).due(NOW * 2)


# -- the series the admin reads ----------------------------------------------------------


@pytest.mark.django_db
def test_current_traffic_is_the_newest_fresh_sample_with_several_multiplexers_merged() -> None:
    sample("a", NOW - 20, calls=999)
    sample("a", NOW - 10, calls=40, errors=4, tokens=800, queue_depth=3,
           latency=latencies(*[0.010] * 40))  # fmt: skip
    sample("a", NOW - 10, source="b", calls=60, tokens=1200, queue_depth=2,
           latency=latencies(*[0.010] * 30, *[0.100] * 30))  # fmt: skip
    sample("stale", NOW - 60, calls=5)
    current = series.current_traffic(now=NOW)
    assert set(current) == {"a"}
    a = current["a"]
    assert a.calls_per_sec == pytest.approx(10.0)
    assert a.errors_per_sec == pytest.approx(0.4)
    assert a.tokens_per_sec == pytest.approx(200.0)
    assert a.queue_depth == 5
    assert a.p50_ms == pytest.approx(10, rel=0.08)
    assert a.p95_ms == pytest.approx(100, rel=0.08)


@pytest.mark.django_db
def test_the_15_minute_chart_has_a_point_per_10_seconds_and_gaps_without_samples() -> None:
    sample("a", NOW - 30, calls=20, errors=2, tokens=100, latency=latencies(*[0.002] * 20))
    sample("a", NOW - 10, calls=0)
    sample("other", NOW - 10, calls=77)
    doc = series.instance_charts("a", FIFTEEN, now=NOW)
    assert doc["x"][-1] == NOW + 10 and len(doc["x"]) == 90
    assert doc["x"][1] - doc["x"][0] == 10
    charts = {chart["id"]: chart for chart in doc["charts"]}
    calls, errors = (s["values"] for s in charts["calls"]["series"])
    at = doc["x"].index(NOW - 30)
    assert calls[at] == pytest.approx(2.0) and errors[at] == pytest.approx(0.2)
    assert calls[at + 1] is None  # no sample: a gap, not a zero
    assert calls[at + 2] == 0.0
    p50 = charts["latency"]["series"][0]["values"]
    assert p50[at] == pytest.approx(2.0, rel=0.08) and p50[at + 2] is None
    assert charts["tokens"]["series"][0]["values"][at] == pytest.approx(10.0)


@pytest.mark.django_db
def test_the_24_hour_chart_sums_5_minute_steps() -> None:
    for offset in range(0, 300, 10):  # one busy step: 30 samples of 10 s
        sample("a", NOW - 300 + 10 + offset, calls=10, queue_depth=offset // 10,
               latency=latencies(*[0.02] * 10))  # fmt: skip
    sample("a", NOW - 3600, calls=30)
    doc = series.instance_charts("a", DAY, now=NOW)
    assert len(doc["x"]) == 288 and doc["x"][-1] == NOW + 300
    charts = {chart["id"]: chart for chart in doc["charts"]}
    calls = charts["calls"]["series"][0]["values"]
    assert calls[doc["x"].index(NOW)] == pytest.approx(1.0)
    assert calls[doc["x"].index(NOW - 3600)] == pytest.approx(3.0)
    assert calls[doc["x"].index(NOW - 1800)] is None
    assert charts["queue"]["series"][0]["values"][doc["x"].index(NOW)] == 29  # its peak


@pytest.mark.django_db
def test_the_fleet_charts_add_up_instances_and_show_gpus_and_statuses() -> None:
    sample("a", NOW - 10, calls=100, errors=10)
    sample("b", NOW - 10, calls=50)
    GpuSample.objects.create(at=NOW - 10, node="n", gpu=0, name="H100", memory_used=2 * 2**30,
                             memory_total=80 * 2**30)  # fmt: skip
    GpuSample.objects.create(at=NOW - 10, node="n", gpu=1, name="H100", memory_used=2**29,
                             memory_total=80 * 2**30)  # fmt: skip
    StatusSample.objects.create(at=NOW - 10, status="running", count=2)
    StatusSample.objects.create(at=NOW - 10, status="failed", count=1)
    StatusSample.objects.create(at=NOW - 10, status="stopped", count=0)
    doc = series.fleet_charts(FIFTEEN, ["pending", "running", "stopped", "failed"], now=NOW)
    at = doc["x"].index(NOW - 10)
    charts = {chart["id"]: chart for chart in doc["charts"]}
    calls, errors = (s["values"][at] for s in charts["fleet-calls"]["series"])
    assert (calls, errors) == (pytest.approx(15.0), pytest.approx(1.0))
    gpus = charts["gpu-memory"]["series"]
    assert [s["label"] for s in gpus] == ["GPU 0 (H100)", "GPU 1 (H100)"]
    assert [s["values"][at] for s in gpus] == [2.0, 0.5]
    statuses = charts["statuses"]["series"]
    assert [s["label"] for s in statuses] == ["running", "failed"]
    assert [s["values"][at] for s in statuses] == [2, 1]
    assert series.fleet_calls_per_sec(now=NOW) == pytest.approx(15.0)
