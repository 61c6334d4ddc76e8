"""B3's engine layer: bare ``session.run`` at each batch size (the ceiling), and the same
session with one intra-op thread, two that sleep between runs, two that spin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.common import interleaved, summarize
from bench.inference_models import BenchModel
from cloud.inference.engine import open_engine

__all__ = ["engine_ceiling", "engine_threads"]


def engine_ceiling(path: Path, model: BenchModel, threads: int, quick: bool) -> list[Any]:
    """Bare ``session.run`` at each of the model's batch sizes: rows/s, p50, p99."""
    engine = open_engine(path, providers=["CPUExecutionProvider"], threads=threads)
    rows = model.rows(max(model.engine_batches))
    calls: dict[str, Callable[[], object]] = {
        str(b): (lambda b=b: engine.run({k: v[:b] for k, v in rows.items()}))
        for b in model.engine_batches
    }
    rounds, per_round = model.engine_timing[1 if quick else 0]
    samples = interleaved(calls, rounds=rounds, calls=per_round, warmup=1)
    return [{"batch": b, **summarize(samples[str(b)], b)} for b in model.engine_batches]


def engine_threads(path: Path, model: BenchModel, quick: bool) -> dict[str, Any]:
    """Rows/s at batch 1 and the largest batch: one intra-op thread, two that sleep between
    runs (what the service opens), two that spin (onnxruntime's default)."""

    def spinning() -> Callable[[dict[str, np.ndarray]], object]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda inputs: session.run(None, inputs)

    runs: dict[str, Callable[[dict[str, np.ndarray]], object]] = {
        "1 thread": open_engine(path, providers=["CPUExecutionProvider"], threads=1).run,
        "2 threads, sleeping": open_engine(path, providers=["CPUExecutionProvider"], threads=2).run,
        "2 threads, spinning": spinning(),
    }
    batches = (1, max(model.engine_batches))
    rows = model.rows(batches[-1])
    calls: dict[str, Callable[[], object]] = {
        f"{name}/{b}": (lambda run=run, b=b: run({k: v[:b] for k, v in rows.items()}))
        for name, run in runs.items()
        for b in batches
    }
    rounds, per_round = model.engine_timing[1 if quick else 0]
    samples = interleaved(calls, rounds=rounds, calls=per_round, warmup=1)
    return {
        name: {b: summarize(samples[f"{name}/{b}"], b)["throughput_per_s"] for b in batches}
        for name in runs
    }
