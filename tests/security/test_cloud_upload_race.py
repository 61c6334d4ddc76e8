"""Uploads of the same bytes at the same moment: a refusal never removes a file in use."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from functools import partial

import httpx

from tests.cloud.api.helpers import upload
from tests.conftest import ADMIN_TOKEN, RunningApi
from tests.onnx_models import tiny_classifier

ROUNDS = 8


def _race(url: str, calls: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Run each call on its own thread and connection, released together."""
    barrier = threading.Barrier(len(calls))
    answers: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        ) as c:
            barrier.wait(10)
            answers[i] = calls[i](c)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(a is not None for a in answers)
    return [a for a in answers if a is not None]


def test_refused_and_valid_uploads_of_the_same_bytes_race_without_losing_a_file(
    api: RunningApi,
) -> None:
    """Each round, two valid uploads (to two models) and two refused ones (a trainable name
    the graph lacks) send the same new bytes at once. Every valid one is registered, every
    refused one is a 400, and every registered version's file is there with its bytes."""
    with api.client() as c:
        for name in ("a", "b", "c", "d"):
            assert c.post("/v1/models", json={"name": name}).status_code == 201
    for seed in range(ROUNDS):
        data = tiny_classifier(seed=100 + seed)
        sha = hashlib.sha256(data).hexdigest()
        bad = {"trainable": ["no.such.tensor"]}
        answers = _race(
            api.url,
            [
                partial(upload, model="a", data=data),
                partial(upload, model="b", data=data),
                partial(upload, model="c", data=data, metadata=bad),
                partial(upload, model="d", data=data, metadata=bad),
            ],
        )
        codes = [a.status_code for a in answers]
        assert codes == [201, 201, 400, 400], [a.text for a in answers]
        assert all("error" in a.json() for a in answers[2:])
        path = api.context.artifacts.path(sha)
        assert path.is_file(), f"round {seed}: the registered artifact's file was deleted"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    with api.client() as c:
        for name in ("a", "b"):
            versions = c.get(f"/v1/models/{name}/versions").json()
            assert len(versions) == ROUNDS
            for v in versions:
                assert c.get(f"/v1/artifacts/{v['sha256']}").status_code == 200
