"""Dynamic batching seen from outside: concurrent requests share batch executions (read from
/metrics), each gets its own rows back, and a full queue answers 503 with Retry-After."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from cloud.inference.pool import Loaded
from shared.tensors import HEADER_LENGTH, decode_response, encode_request
from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference

INFER = f"/v2/models/{MODEL}/infer"


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) for a state of the server; not a timing assertion."""
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, f"never saw: {what}"
        time.sleep(0.01)


@contextmanager
def gated(loaded: Loaded) -> Iterator[threading.Event]:
    """The engine waits for the returned event before each run."""
    gate = threading.Event()
    run = loaded.batcher.run

    def held(inputs: dict[str, Any]) -> dict[str, Any]:
        gate.wait(30)
        return run(inputs)

    loaded.batcher.run = held
    try:
        yield gate
    finally:
        gate.set()
        loaded.batcher.run = run


def _loaded(inference: RunningInference) -> Loaded:
    return inference.service.pool.get(inference.service.catalog.resolve(MODEL, None))


def _post(inference: RunningInference, row: np.ndarray) -> httpx.Response:
    body, headers = encode_request({"input": row}, binary=True)
    with inference.client() as c:
        return c.post(INFER, content=body, headers=headers)


def _samples(inference: RunningInference) -> dict[str, float]:
    with inference.client() as c:
        text = c.get("/metrics").text
    labels = {"model": MODEL, "version": "2"}
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels == labels
    }


def test_concurrent_requests_share_batch_executions(inference: RunningInference) -> None:
    """Twelve requests arrive while the engine is busy with a first one: they run in far
    fewer executions than requests, and every caller gets exactly its own rows."""
    loaded = _loaded(inference)
    rows = [np.full((1, FEATURES), i / 10, dtype=np.float32) for i in range(13)]
    with gated(loaded) as gate, ThreadPoolExecutor(13) as pool:
        first = pool.submit(_post, inference, rows[0])
        _wait_for(lambda: loaded.batcher.busy, "the first request in the engine")
        rest = [pool.submit(_post, inference, r) for r in rows[1:]]
        _wait_for(lambda: loaded.batcher.depth == 12, "twelve requests queued")
        gate.set()
        answers = [first.result(), *(f.result() for f in rest)]
    expected = loaded.engine.run({"input": np.concatenate(rows)})["probabilities"]
    for i, answer in enumerate(answers):
        assert answer.status_code == 200, answer.text
        length = int(answer.headers[HEADER_LENGTH])
        got = decode_response(answer.content, length).outputs["probabilities"]
        np.testing.assert_allclose(got, expected[i : i + 1], rtol=1e-6)
    seen = _samples(inference)
    assert seen["nv_inference_request_success_total"] == 13
    assert seen["nv_inference_count_total"] == 13
    assert seen["nv_inference_exec_count_total"] == 2  # the first alone, then the twelve
    assert seen["nv_inference_batch_size_count"] == 2
    assert seen["nv_inference_batch_size_sum"] == 13


def test_a_full_queue_answers_503_with_retry_after(inference: RunningInference) -> None:
    """With room for two waiting requests and the engine busy, a third waiting one is
    refused at once with 503 and Retry-After; the queued ones are still answered."""
    loaded = _loaded(inference)
    loaded.batcher.config = dataclasses.replace(loaded.batcher.config, max_queue=2)
    row = np.zeros((1, FEATURES), dtype=np.float32)
    with gated(loaded) as gate, ThreadPoolExecutor(3) as pool:
        running = pool.submit(_post, inference, row)
        _wait_for(lambda: loaded.batcher.busy, "the first request in the engine")
        queued = [pool.submit(_post, inference, row) for _ in range(2)]
        _wait_for(lambda: loaded.batcher.depth == 2, "two requests queued")
        refused = _post(inference, row)
        gate.set()
        assert [f.result().status_code for f in (running, *queued)] == [200, 200, 200]
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "overloaded" in refused.json()["error"]
    failures = inference.metric(
        "nv_inference_request_failure_total", model=MODEL, version="2", reason="REJECTED"
    )
    assert failures == 1
