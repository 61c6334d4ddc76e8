"""B3's arithmetic: one run's figures (throughput, percentiles, CPU per call), medians over
rounds, and the ratios the targets are read from, paired within a round."""

from __future__ import annotations

import statistics
from typing import Any

from bench.common import percentile

__all__ = ["capacity", "median_of", "ratios", "stats"]


def stats(result: dict[str, Any]) -> dict[str, float]:
    latencies = result["latencies"] or [float("nan")]
    done = result.get("completed", len(result["latencies"]))
    calls = max(1, len(result["latencies"]))
    stats = {
        "throughput_per_s": round(done / result["seconds"], 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "error_rate": round(result["errors"] / calls, 4),
        "requests": done,
    }
    # CPU per call: unlike wall time, hardly moved by neighbours taking turns on the cores.
    for side in ("server", "client"):
        if f"{side}_cpu_s" in result:
            stats[f"{side}_cpu_ms_per_call"] = round(result[f"{side}_cpu_s"] * 1000 / calls, 3)
    return stats


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def capacity(points: dict[Any, dict[str, float]]) -> dict[str, float]:
    return max(points.values(), key=lambda p: p["throughput_per_s"])


def _at_p99(points: dict[Any, dict[str, float]], bound: float) -> float:
    """The most requests/s among the points whose p99 is within ``bound`` (0: none is)."""
    within = [p["throughput_per_s"] for p in points.values() if p["p99_ms"] <= bound]
    return max(within, default=0.0)


def _paired(rounds: dict[str, list[float]], over: str, under: str) -> float:
    """The median over rounds of (best of the configurations ``over``) / (best of
    ``under``) within each round: both sides met the same neighbours. A name ending in "/"
    stands for every configuration under it ("http_binary/": each concurrency)."""

    def named(name: str) -> list[str]:
        return [n for n in rounds if n.startswith(name)] if name.endswith("/") else [name]

    tops, bottoms = named(over), named(under)
    ratios = []
    for r in range(len(rounds[tops[0]])):
        top = max(rounds[n][r] for n in tops)
        bottom = max(rounds[n][r] for n in bottoms)
        if bottom > 0:
            ratios.append(top / bottom)
    return round(statistics.median(ratios), 3) if ratios else float("nan")


def ratios(r: dict[str, Any]) -> dict[str, float]:
    """Throughput ratios, each paired within a round (median over rounds); and batched vs
    unbatched at the unbatched service's p99 from the medians."""
    rounds = r["closed_loop_rounds"]
    closed = r["closed_loop"]
    unbatched = capacity(closed["http_binary_unbatched"])
    at_p99 = _at_p99(closed["http_binary"], unbatched["p99_ms"])
    return {
        "http_binary_vs_engine_best": _paired(rounds, "http_binary/", "engine/"),
        "http_binary_vs_engine_batch1": _paired(rounds, "http_binary/", "engine/1"),
        "engine_best_vs_batch1": _paired(rounds, "engine/", "engine/1"),
        "batched_vs_unbatched_http_binary": _paired(
            rounds, "http_binary/", "http_binary_unbatched/"
        ),
        "batched_vs_unbatched_http_binary_at_equal_p99": round(
            at_p99 / unbatched["throughput_per_s"], 3
        )
        if unbatched["throughput_per_s"]
        else float("nan"),
        "batched_vs_unbatched_in_process": _paired(
            r["in_process_rounds"], "batched/", "unbatched/"
        ),
        "http_binary_vs_http_json": _paired(rounds, "http_binary/", "http_json/"),
        "grpc_vs_http_binary": _paired(rounds, "grpc/", "http_binary/"),
    }
