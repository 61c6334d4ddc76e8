"""The warm REST path stays on the event loop: once the token, the version and its session
are cached, an inference request is decoded and queued without a thread-pool hop (a hop
costs more than decoding a small request, and on two cores it is a context switch more)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio.to_thread
import numpy as np
import pytest

from shared.tensors import encode_request
from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference

INFER = f"/v2/models/{MODEL}/infer"


def test_a_warm_request_takes_no_thread_pool_hop(
    inference: RunningInference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One request warms the caches; five more are answered while anyio's thread pool
    counts every function it is given: none."""
    rows = np.random.default_rng(0).normal(size=(2, FEATURES)).astype(np.float32)
    body, headers = encode_request({"input": rows}, binary=True)
    hops: list[str] = []
    real = anyio.to_thread.run_sync

    async def counting(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        hops.append(getattr(func, "__qualname__", repr(func)))
        return await real(func, *args, **kwargs)

    with inference.client() as client:
        assert client.post(INFER, content=body, headers=headers).status_code == 200
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        for _ in range(5):
            assert client.post(INFER, content=body, headers=headers).status_code == 200
    assert hops == []
