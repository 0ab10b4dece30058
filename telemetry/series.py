"""The fleet's time series: written in batches (the multiplexer's roll-up, each worker's GPU
sampler, beat's fleet tick), read back for the admin's columns and charts.

A chart is a window (the last 15 minutes in 10-second steps, or the last 24 hours in
5-minute steps) of points at the end of each step; a step with no sample is a gap (None),
not a zero: the multiplexer was down, or the instance did not exist. Rates are the calls
of a step over the seconds its samples cover; p50 / p95 come from the step's merged
latency histograms; the queue depth of a step is its longest queue.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction
from django.db.models import Max, Sum

from telemetry import histogram
from telemetry.models import GpuSample, StatusSample, TrafficSample

STEP_SECS = 10
RETENTION_SECS = 24 * 3600
# The list's current values are the newest sample, if it is this recent.
FRESH_SECS = 3 * STEP_SECS
GIB = 2**30


@dataclass(frozen=True)
class Window:
    name: str
    span: int  # seconds shown
    step: int  # seconds per point
    refresh_ms: int  # how often the admin redraws it


WINDOWS = {
    "15m": Window("15m", 15 * 60, STEP_SECS, 10_000),
    "24h": Window("24h", 24 * 3600, 5 * 60, 60_000),
}


@dataclass(frozen=True)
class InstanceWindow:
    """One instance's calls over one roll-up window of one multiplexer."""

    instance: str
    seconds: float
    calls: int = 0
    errors: int = 0
    tokens: int = 0
    latency: Mapping[int, int] = field(default_factory=dict)
    queue_depth: int = 0
    in_flight: int = 0


@dataclass(frozen=True)
class CurrentTraffic:
    """An instance's newest roll-up: what the instance list shows."""

    at: int
    calls_per_sec: float
    errors_per_sec: float
    tokens_per_sec: float
    p50_ms: float | None
    p95_ms: float | None
    queue_depth: int

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "calls_per_sec": self.calls_per_sec,
            "errors_per_sec": self.errors_per_sec,
            "tokens_per_sec": self.tokens_per_sec,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "queue_depth": self.queue_depth,
        }


def aligned(moment: float, step: int = STEP_SECS) -> int:
    """`moment` rounded down to a whole step."""
    return int(moment // step) * step


# -- writing ---------------------------------------------------------------------------


def record_traffic(at: int, source: str, windows: Iterable[InstanceWindow]) -> int:
    rows = [
        TrafficSample(
            at=at,
            instance=window.instance,
            source=source,
            seconds=window.seconds,
            calls=window.calls,
            errors=window.errors,
            tokens=window.tokens,
            latency={str(index): count for index, count in window.latency.items()},
            queue_depth=window.queue_depth,
            in_flight=window.in_flight,
        )
        for window in windows
    ]
    if rows:
        TrafficSample.objects.bulk_create(rows)
    return len(rows)


def record_gpus(at: int, node: str, gpus: Iterable[Any]) -> int:
    """`gpus`: instances.gpu.GpuStats (or anything with the same fields)."""
    rows = [
        GpuSample(
            at=at,
            node=node,
            gpu=stats.index,
            name=stats.name,
            memory_used=stats.memory_used_bytes,
            memory_total=stats.memory_total_bytes,
            utilization=stats.utilization_percent,
        )
        for stats in gpus
    ]
    if rows:
        GpuSample.objects.bulk_create(rows)
    return len(rows)


def record_statuses(at: int, counts: Mapping[str, int]) -> int:
    rows = [StatusSample(at=at, status=status, count=count) for status, count in counts.items()]
    with transaction.atomic():
        StatusSample.objects.filter(at=at).delete()  # one tick per step, even if beat repeats
        StatusSample.objects.bulk_create(rows)
    return len(rows)


def prune(model: Any, now: float | None = None) -> int:
    """Delete `model`'s samples older than RETENTION_SECS."""
    cutoff = (time.time() if now is None else now) - RETENTION_SECS
    deleted, _ = model.objects.filter(at__lt=cutoff).delete()
    return int(deleted)


# -- reading ---------------------------------------------------------------------------


def current_traffic(now: float | None = None) -> dict[str, CurrentTraffic]:
    """Per instance, its newest roll-up (all multiplexers' rows for that moment merged), if
    it is at most FRESH_SECS old."""
    now = time.time() if now is None else now
    rows = TrafficSample.objects.filter(at__gte=now - FRESH_SECS).values_list(
        "instance", "at", "seconds", "calls", "errors", "tokens", "latency", "queue_depth"
    )
    newest: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        kept = newest.get(row[0])
        if kept is None or row[1] > kept[0][1]:
            newest[row[0]] = [row]
        elif row[1] == kept[0][1]:
            kept.append(row)
    current = {}
    for name, samples in newest.items():
        point = _Point()
        for _, _, seconds, calls, errors, tokens, latency, depth in samples:
            point.add(seconds, calls, errors, tokens, latency, depth, 0, same_moment=True)
        current[name] = CurrentTraffic(
            at=samples[0][1],
            calls_per_sec=point.rate(point.calls),
            errors_per_sec=point.rate(point.errors),
            tokens_per_sec=point.rate(point.tokens),
            p50_ms=_ms(histogram.quantile(point.latency, 0.5)),
            p95_ms=_ms(histogram.quantile(point.latency, 0.95)),
            queue_depth=point.queue_depth,
        )
    return current


def instance_charts(name: str, window: Window, now: float | None = None) -> dict[str, Any]:
    """One instance's charts: calls and errors per second, p50 and p95 latency, tokens per
    second, queue depth and calls in flight."""
    xs, start, end = _axis(window, now)
    rows = TrafficSample.objects.filter(instance=name, at__gt=start, at__lte=end).values_list(
        "at", "seconds", "calls", "errors", "tokens", "latency", "queue_depth", "in_flight"
    )
    moments: dict[int, _Point] = {}
    for at, seconds, calls, errors, tokens, latency, depth, in_flight in rows:
        point = moments.setdefault(at, _Point())
        point.add(seconds, calls, errors, tokens, latency, depth, in_flight, same_moment=True)
    steps: dict[int, _Point] = {}
    for at in sorted(moments):
        steps.setdefault(_step_end(at, window.step), _Point()).extend(moments[at])
    points = [steps.get(x) for x in xs]

    def each(read: Any) -> list[float | None]:
        return [None if p is None else read(p) for p in points]

    return _document(
        window,
        xs,
        [
            _chart(
                "calls",
                "Calls per second",
                "/s",
                ("calls", each(lambda p: p.rate(p.calls))),
                ("errors", each(lambda p: p.rate(p.errors))),
            ),
            _chart(
                "latency",
                "Latency (ms)",
                "ms",
                ("p50", each(lambda p: _ms(histogram.quantile(p.latency, 0.5)))),
                ("p95", each(lambda p: _ms(histogram.quantile(p.latency, 0.95)))),
            ),
            _chart(
                "tokens", "Tokens per second", "/s", ("tokens", each(lambda p: p.rate(p.tokens)))
            ),
            _chart(
                "queue",
                "Queue",
                "",
                ("queued (most)", each(lambda p: p.queue_depth)),
                ("in flight", each(lambda p: p.in_flight)),
            ),
        ],
    )


def fleet_charts(
    window: Window, statuses: Iterable[str], now: float | None = None
) -> dict[str, Any]:
    """The fleet: calls per second over every instance, GPU memory used per GPU (GiB), and
    how many instances were in each of `statuses` (in that order)."""
    xs, start, end = _axis(window, now)
    per_moment = (
        TrafficSample.objects.filter(at__gt=start, at__lte=end)
        .values("at")
        .annotate(calls=Sum("calls"), errors=Sum("errors"), seconds=Max("seconds"))
        .values_list("at", "calls", "errors", "seconds")
    )
    calls: dict[int, list[float]] = {}
    for at, count, errors, seconds in per_moment:
        total = calls.setdefault(_step_end(at, window.step), [0.0, 0.0, 0.0])
        total[0] += count
        total[1] += errors
        total[2] += seconds

    def rate(x: int, index: int) -> float | None:
        total = calls.get(x)
        return None if total is None or not total[2] else total[index] / total[2]

    charts = [
        _chart(
            "fleet-calls",
            "Calls per second, all instances",
            "/s",
            ("calls", [rate(x, 0) for x in xs]),
            ("errors", [rate(x, 1) for x in xs]),
        ),
        _gpu_chart(xs, start, end, window.step),
        _status_chart(xs, start, end, window.step, list(statuses)),
    ]
    return _document(window, xs, charts)


def fleet_calls_per_sec(now: float | None = None) -> float | None:
    """Calls per second over every instance in the newest roll-up (None: no fresh one)."""
    current = current_traffic(now)
    if not current:
        return None
    return sum(traffic.calls_per_sec for traffic in current.values())


# -- helpers ---------------------------------------------------------------------------


class _Point:
    """What a chart point (or a current value) sums over."""

    __slots__ = (
        "calls",
        "errors",
        "in_flight",
        "latency",
        "queue_depth",
        "seconds",
        "tokens",
    )

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = self.errors = self.tokens = 0
        self.queue_depth = self.in_flight = 0
        self.latency: histogram.Sparse = {}

    def add(
        self,
        seconds: float,
        calls: int,
        errors: int,
        tokens: int,
        latency: Mapping[str, int],
        queue_depth: int,
        in_flight: int,
        *,
        same_moment: bool,
    ) -> None:
        # Rows of one moment come from several multiplexers over the same window.
        self.seconds = max(self.seconds, seconds) if same_moment else self.seconds + seconds
        self.calls += calls
        self.errors += errors
        self.tokens += tokens
        self.latency = histogram.merge((self.latency, histogram.from_json(latency)))
        self.queue_depth += queue_depth
        self.in_flight += in_flight

    def extend(self, moment: _Point) -> None:
        """Add a later moment to this step: times add up, the queue keeps its peak."""
        self.seconds += moment.seconds
        self.calls += moment.calls
        self.errors += moment.errors
        self.tokens += moment.tokens
        self.latency = histogram.merge((self.latency, moment.latency))
        self.queue_depth = max(self.queue_depth, moment.queue_depth)
        self.in_flight = moment.in_flight

    def rate(self, count: int) -> float:
        return count / self.seconds if self.seconds > 0 else 0.0


def _axis(window: Window, now: float | None) -> tuple[list[int], int, int]:
    """The step ends shown, oldest first, and the (start, end] they cover."""
    end = aligned(time.time() if now is None else now, window.step) + window.step
    start = end - window.span
    return list(range(start + window.step, end + 1, window.step)), start, end


def _step_end(at: int, step: int) -> int:
    return -(-at // step) * step


def _gpu_chart(xs: list[int], start: int, end: int, step: int) -> dict[str, Any]:
    rows = GpuSample.objects.filter(at__gt=start, at__lte=end).values_list(
        "at", "node", "gpu", "name", "memory_used"
    )
    used: dict[tuple[str, int], dict[int, int]] = {}
    names: dict[tuple[str, int], str] = {}
    for at, node, index, name, memory in rows:
        key = (node, index)
        names[key] = name
        by_step = used.setdefault(key, {})
        x = _step_end(at, step)
        by_step[x] = max(by_step.get(x, 0), memory)
    several_nodes = len({node for node, _ in used}) > 1
    series = []
    for key in sorted(used):
        node, index = key
        label = f"{node}/GPU {index}" if several_nodes else f"GPU {index}"
        label += f" ({names[key]})" if names[key] else ""
        series.append((label, [_gib(used[key].get(x)) for x in xs]))
    return _chart("gpu-memory", "GPU memory used (GiB)", "GiB", *series)


def _status_chart(
    xs: list[int], start: int, end: int, step: int, statuses: list[str]
) -> dict[str, Any]:
    rows = StatusSample.objects.filter(at__gt=start, at__lte=end).values_list(
        "at", "status", "count"
    )
    latest: dict[str, dict[int, tuple[int, int]]] = {}
    for at, status, count in rows:
        by_step = latest.setdefault(status, {})
        x = _step_end(at, step)
        if x not in by_step or by_step[x][0] < at:
            by_step[x] = (at, count)
    moments = {x for by_step in latest.values() for x in by_step}
    shown = [s for s in statuses if any(c for _, c in latest.get(s, {}).values())]
    series = [
        (status, [latest[status][x][1] if x in latest[status] else (0 if x in moments else None)
                  for x in xs])
        for status in shown
    ]  # fmt: skip
    return _chart("statuses", "Instances by status", "", *series)


def _chart(chart_id: str, title: str, unit: str, *series: tuple[str, list[Any]]) -> dict[str, Any]:
    return {
        "id": chart_id,
        "title": title,
        "unit": unit,
        "series": [{"label": label, "values": values} for label, values in series],
    }


def _document(window: Window, xs: list[int], charts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "window": window.name,
        "step": window.step,
        "refresh_ms": window.refresh_ms,
        "x": xs,
        "charts": charts,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _gib(size: int | None) -> float | None:
    return None if size is None else size / GIB
