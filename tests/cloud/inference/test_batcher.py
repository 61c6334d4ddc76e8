"""The batcher on its own, with a stand-in engine: a request the engine refuses fails alone,
and a request that waited past the queue timeout is answered 503, never left waiting."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from cloud.inference.batcher import BatchConfig, Batcher
from cloud.inference.metrics import InferenceMetrics
from shared.errors import InferenceFailed, ServiceUnavailable


def _config(**changes: Any) -> BatchConfig:
    values: dict[str, Any] = {
        "max_batch_size": 8, "max_queue_delay_s": 0.0, "max_queue": 8, "queue_timeout_s": 30.0
    }  # fmt: skip
    return BatchConfig(**{**values, **changes})


def test_one_bad_request_in_a_batch_fails_alone() -> None:
    """The engine refuses any batch holding a negative row: run together, the batch fails;
    run again one by one, only the negative request fails."""
    gate = threading.Event()

    def run(inputs: dict[str, Any]) -> dict[str, Any]:
        gate.wait(30)
        if (inputs["x"] < 0).any():
            raise RuntimeError("negative input")
        return {"y": inputs["x"] * 2}

    batcher = Batcher(run, _config(), model="m", version=1, metrics=InferenceMetrics())
    try:
        blocker = batcher.submit({"x": np.ones((1, 1))}, 1)
        while not batcher.busy:
            threading.Event().wait(0.01)
        good = batcher.submit({"x": np.full((1, 1), 3.0)}, 1)
        bad = batcher.submit({"x": np.full((1, 1), -1.0)}, 1)
        gate.set()
        assert blocker.result(30)["y"].tolist() == [[2.0]]
        assert good.result(30)["y"].tolist() == [[6.0]]
        with pytest.raises(InferenceFailed, match="negative input"):
            bad.result(30)
    finally:
        batcher.close()
        batcher.join(5)


def test_a_request_that_waited_too_long_is_503_not_run() -> None:
    """Queued behind a slow batch past queue_timeout_s, a request is answered 503 with a
    Retry-After instead of running late."""
    clock = [0.0]
    gate = threading.Event()
    ran: list[int] = []

    def run(inputs: dict[str, Any]) -> dict[str, Any]:
        gate.wait(30)
        ran.append(len(inputs["x"]))
        return {"y": inputs["x"]}

    batcher = Batcher(
        run, _config(max_batch_size=1, queue_timeout_s=5.0), model="m", version=1,
        metrics=InferenceMetrics(), clock=lambda: clock[0],
    )  # fmt: skip
    try:
        first = batcher.submit({"x": np.ones((1, 1))}, 1)
        while not batcher.busy:
            threading.Event().wait(0.01)
        late = batcher.submit({"x": np.ones((1, 1))}, 1)
        clock[0] = 6.0
        gate.set()
        first.result(30)
        with pytest.raises(ServiceUnavailable, match="in the queue") as refused:
            late.result(30)
        assert refused.value.retry_after_s == 1.0
        assert ran == [1]
    finally:
        batcher.close()
        batcher.join(5)
