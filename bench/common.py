"""Helpers shared by the benchmarks: interleaved timing, percentiles, machine facts, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def interleaved(
    engines: dict[str, Callable[[], object]], *, rounds: int, calls: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Per-call seconds for each engine, engines taking turns round by round so that a
    noisy neighbour slows all of them alike (side-by-side ratios stay honest)."""
    for fn in engines.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, fn in engines.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
    return samples


def summarize(seconds: list[float], batch: int) -> dict[str, float]:
    p50 = statistics.median(seconds)
    return {
        "p50_ms": round(p50 * 1000, 4),
        "p99_ms": round(percentile(seconds, 99) * 1000, 4),
        "throughput_per_s": round(batch / p50, 2),
        "calls": len(seconds),
    }


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    return path
