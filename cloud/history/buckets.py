"""The latency histogram kept per minute: fixed bucket bounds (so buckets add up in SQL with
SUM), a device's own histogram re-binned onto them, and percentiles read off the sums."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from shared.messages import Histogram

__all__ = ["BOUNDS_MS", "BUCKETS", "percentile", "rebin", "targets"]

# Upper bounds in ms; one more bucket past the last (+inf). They include the agent's own
# bounds (edge_agent.telemetry.LATENCY_BOUNDS_MS), so an agent's histogram lands here
# exactly; a histogram with other bounds goes bucket by bucket to ours that holds its upper
# bound, which can only move a count up (a percentile then errs slow, never fast). The
# columns lat_00.. of ``telemetry_minutes`` hold these buckets in this order.
BOUNDS_MS: tuple[float, ...] = (
    0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
)  # fmt: skip
BUCKETS = len(BOUNDS_MS) + 1


def targets(histogram: Histogram) -> list[int]:
    """For each of ``histogram``'s buckets, the index of ours it goes to."""
    bounds = tuple(histogram.bounds)
    found = _TARGETS.get(bounds)
    if found is None:
        found = [bisect.bisect_left(BOUNDS_MS, b) for b in bounds] + [BUCKETS - 1]
        if len(_TARGETS) < 64:  # a fleet uses a handful of bound sets; a hostile one, many
            _TARGETS[bounds] = found
    return found


def rebin(histogram: Histogram) -> list[int]:
    """``histogram``'s counts on :data:`BOUNDS_MS` (length :data:`BUCKETS`)."""
    counts = [0] * BUCKETS
    for target, count in zip(targets(histogram), histogram.counts, strict=True):
        counts[target] += count
    return counts


_TARGETS: dict[tuple[float, ...], list[int]] = {}


def percentile(counts: Sequence[int], q: float) -> float | None:
    """The ``q`` quantile (0..1) of a histogram on :data:`BOUNDS_MS`, interpolated linearly
    inside its bucket (as Prometheus' histogram_quantile); the last finite bound for what
    falls in the +inf bucket; None for an empty histogram."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index >= len(BOUNDS_MS):
                return BOUNDS_MS[-1]
            lower = BOUNDS_MS[index - 1] if index else 0.0
            upper = BOUNDS_MS[index]
            return lower + (upper - lower) * max(rank - seen, 0.0) / count
        seen += count
    return BOUNDS_MS[-1]
