"""Latency histograms with fixed log-spaced buckets: cheap to fill on the hot path (one
bisect), exact to merge (add the counts), and p50 / p95 read back within a bucket's width.

Bucket `i` holds latencies in (BOUNDS[i-1], BOUNDS[i]]; bucket 0 everything up to
BOUNDS[0], the last one everything above BOUNDS[-1]. Sixteen buckets per decade from
0.1 ms to 100 s: a quantile is off by at most 7.5 % (half a bucket, interpolated).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PER_DECADE = 16
LOWEST_SECS = 1e-4
DECADES = 6
BOUNDS: tuple[float, ...] = tuple(
    LOWEST_SECS * 10 ** (i / PER_DECADE) for i in range(DECADES * PER_DECADE + 1)
)
SIZE = len(BOUNDS) + 1

Sparse = dict[int, int]  # bucket index -> count, the non-empty buckets only


def sparse(counts: Iterable[int]) -> Sparse:
    return {index: count for index, count in enumerate(counts) if count}


def merge(histograms: Iterable[Mapping[int, int]]) -> Sparse:
    merged: Sparse = {}
    for histogram in histograms:
        for index, count in histogram.items():
            merged[index] = merged.get(index, 0) + count
    return merged


def quantile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q < 1) in seconds, interpolated geometrically inside its bucket;
    None for an empty histogram."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index in sorted(histogram):
        count = histogram[index]
        if seen + count >= rank:
            low, high = _edges(index)
            fraction = (rank - seen) / count
            return low * (high / low) ** fraction
        seen += count
    return _edges(max(histogram))[1]


def _edges(index: int) -> tuple[float, float]:
    if index <= 0:
        return BOUNDS[0] / 10 ** (1 / PER_DECADE), BOUNDS[0]
    if index >= len(BOUNDS):
        return BOUNDS[-1], BOUNDS[-1] * 10 ** (1 / PER_DECADE)
    return BOUNDS[index - 1], BOUNDS[index]


def from_json(data: Mapping[str, int]) -> Sparse:
    """A histogram as stored (JSON object keys are strings)."""
    return {int(index): int(count) for index, count in data.items()}
