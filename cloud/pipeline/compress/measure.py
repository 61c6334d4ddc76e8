"""What a compressed child records about itself: its size and p50 latency beside its
parent's (timed side by side, in turns, on this machine) and the routing curve's APGR."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.evaluate import make_session
from shared.messages import RoutingPolicy
from shared.routing import confidence

__all__ = ["apgr", "compare_latency", "size_metrics"]

Array = npt.NDArray[Any]
_BUDGET_S = 0.25  # per model per round: a registration takes a few seconds at most


def size_metrics(child: bytes, parent: bytes) -> dict[str, float]:
    return {
        "size_bytes": float(len(child)),
        "parent_size_bytes": float(len(parent)),
        "size_ratio": round(len(child) / len(parent), 4),
    }


def compare_latency(
    child: bytes,
    parent: bytes,
    inputs: dict[str, Array],
    *,
    rounds: int = 7,
    batch: int = 1,
    threads: int = 1,
) -> dict[str, Any]:
    """p50 of ``child`` and ``parent`` on the first ``batch`` rows, taking turns round by
    round so that whatever else runs on the machine slows both alike; the ratio is the
    claim (child / parent: below 1 is faster), not the absolute times."""
    feed = {k: v[:batch] for k, v in inputs.items()}
    sessions = {"child": make_session(child, threads=threads)}
    sessions["parent"] = make_session(parent, threads=threads)
    once = []
    for session in sessions.values():
        session.run(None, feed)  # the first run allocates; not timed
        start = time.perf_counter()
        session.run(None, feed)
        once.append(time.perf_counter() - start)
    calls = int(min(200, max(1, _BUDGET_S / max(max(once), 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            for _ in range(calls):
                start = time.perf_counter()
                session.run(None, feed)
                samples[name].append(time.perf_counter() - start)
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    return {
        "p50_ms": round(p50["child"] * 1000, 4),
        "parent_p50_ms": round(p50["parent"] * 1000, 4),
        "latency_ratio": round(p50["child"] / p50["parent"], 4),
        "batch": batch,
        "threads": threads,
        "calls": calls * rounds,
        # Where the figures hold: FP16 timed on a CPU runs through casts, unlike on a GPU.
        "provider": sessions["child"].get_providers()[0],
    }


def apgr(
    edge_probs: Array, cloud_probs: Array, labels: Array, conf: Array | None = None
) -> float | None:
    """Area under the accuracy-vs-offload curve as a share of the edge→cloud gap, offloading
    the least confident first (``conf``; max probability when not given). None when the
    cloud is no better than the edge on these rows (there is no gap to recover)."""
    edge_ok = edge_probs.argmax(axis=1) == labels
    cloud_ok = cloud_probs.argmax(axis=1) == labels
    gap = float(cloud_ok.mean() - edge_ok.mean())
    if gap <= 0:
        return None
    scores = conf if conf is not None else confidence(edge_probs, RoutingPolicy.MAX_PROB)
    order = np.argsort(scores, kind="stable")
    gains = (cloud_ok[order].astype(np.int64) - edge_ok[order].astype(np.int64)).cumsum()
    curve = (edge_ok.sum() + np.concatenate([[0], gains])) / len(order)
    recovered = (curve - edge_ok.mean()) / gap
    return round(float(np.trapezoid(recovered, dx=1 / (len(curve) - 1))), 4)
