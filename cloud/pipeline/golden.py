"""Golden examples for a device's health check: a few inputs and the outputs they must give."""

from __future__ import annotations

from typing import Any

import numpy.typing as npt

from cloud.pipeline.evaluate import make_session
from shared.messages import GoldenExample, HealthCheckSpec

__all__ = ["golden_examples"]

Array = npt.NDArray[Any]


def golden_examples(
    model: bytes,
    inputs: dict[str, Array],
    *,
    count: int = 4,
    atol: float = 1e-3,
    max_latency_ms: float = 1000.0,
) -> HealthCheckSpec:
    """Run ``model`` on the first ``count`` rows, one row at a time (as a device would)."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    rows = min(count, len(next(iter(inputs.values()))))
    golden = []
    for i in range(rows):
        feed = {k: v[i : i + 1] for k, v in inputs.items()}
        outputs = session.run(names, feed)
        golden.append(
            GoldenExample(
                inputs={k: v.reshape(-1).astype(float).tolist() for k, v in feed.items()},
                outputs={
                    n: o.reshape(-1).astype(float).tolist()
                    for n, o in zip(names, outputs, strict=True)
                },
            )
        )
    return HealthCheckSpec(golden=golden, atol=atol, max_latency_ms=max_latency_ms)
