"""Who may infer, how often, and answers kept in Redis: device tokens verified from a
short-lived cache (no SQL per request), a per-device rate limit (429 + Retry-After), and the
optional result cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import event

from cloud.context import CloudContext
from shared.tensors import encode_request
from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference, serving

INFER = f"/v2/models/{MODEL}/infer"


def _body(value: float = 0.25) -> tuple[bytes, dict[str, str]]:
    return encode_request({"input": np.full((1, FEATURES), value, dtype=np.float32)})


@contextmanager
def counted_sql(context: CloudContext) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(*args: Any) -> None:
        statements.append(str(args[2]))

    engine = context.database.engine
    event.listen(engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_device_infers_with_its_token_without_sql_per_request(
    inference: RunningInference,
) -> None:
    """After a first request, further ones from the same device touch no SQL at all (token
    and model version are both cached); an unknown token is 401."""
    body, headers = _body()
    with inference.client(inference.device_token) as device:
        assert device.post(INFER, content=body, headers=headers).status_code == 200
        with counted_sql(inference.context) as statements:
            for _ in range(5):
                assert device.post(INFER, content=body, headers=headers).status_code == 200
    assert statements == []
    with inference.client("efd_not-a-token") as stranger:
        refused = stranger.post(INFER, content=body, headers=headers)
    assert refused.status_code == 401
    assert "unknown device token" in refused.json()["error"]


def test_a_device_over_its_rate_limit_gets_429_with_retry_after(
    registered: CloudContext,
) -> None:
    """Three requests per minute: the fourth is 429 with Retry-After; the admin is not
    limited."""
    with serving(registered, inference_rate_limit=3, inference_rate_window_s=60.0) as running:
        body, headers = _body()
        with running.client(running.device_token) as device:
            statuses = [device.post(INFER, content=body, headers=headers) for _ in range(4)]
        with running.client() as admin:
            assert admin.post(INFER, content=body, headers=headers).status_code == 200
    assert [r.status_code for r in statuses] == [200, 200, 200, 429]
    assert 1 <= int(statuses[-1].headers["retry-after"]) <= 60
    assert "limit of 3 requests" in statuses[-1].json()["error"]


def test_the_result_cache_answers_the_same_input_from_redis(registered: CloudContext) -> None:
    """With the cache on, the same rows twice are one miss and one hit with the same answer;
    other rows miss again."""
    with serving(registered, inference_result_cache=True) as running, running.client() as c:
        body, headers = _body(0.5)
        first = c.post(INFER, content=body, headers=headers)
        again = c.post(INFER, content=body, headers=headers)
        other_body, other_headers = _body(0.75)
        other = c.post(INFER, content=other_body, headers=other_headers)
        hits = running.metric("nv_cache_num_hits_per_model_total", model=MODEL, version="2")
        misses = running.metric("nv_cache_num_misses_per_model_total", model=MODEL, version="2")
    assert [r.status_code for r in (first, again, other)] == [200, 200, 200]
    assert again.content == first.content
    assert other.content != first.content
    assert (hits, misses) == (1, 2)


def test_the_result_cache_is_off_by_default(inference: RunningInference) -> None:
    """Nothing is looked up or stored in Redis unless the setting asks for it."""
    body, headers = _body()
    with inference.client() as c:
        c.post(INFER, content=body, headers=headers)
    assert inference.context.redis.keys("edgefleet:infer:*") == []
