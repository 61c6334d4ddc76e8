"""What an agent with learning on keeps: the rows the cloud answered (labelled with its top
class) and the labels apps send on POST /v1/feedback, checked against the served model (a
bad body is a 4xx and stores nothing); the buffer and SuperNode state in telemetry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.local_api import LocalApi
from edge_agent.router import CircuitBreaker, CloudClient
from shared.messages import RoutingPolicy, RoutingSpec, Telemetry, TensorSpec, decode
from tests.edge_agent.support import agent_settings, identity_model, manifest_for
from tests.edge_agent.test_router import Cloud

SPEC = [TensorSpec(name="input", datatype="FP32", shape=[-1, 3])]
OUT = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3])]


@dataclass
class Learner:
    agent: Agent
    url: str
    cloud: Cloud


def _serve(agent: Agent, tmp_path: Path, *, model: str, trainable: list[str]) -> None:
    data = identity_model()
    path = tmp_path / f"{model}.onnx"
    path.write_bytes(data)
    spec = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0.6)
    manifest = manifest_for(data, model=model, inputs=SPEC, outputs=OUT, routing=spec)
    manifest = manifest.model_copy(update={"trainable": trainable})
    agent.runtime.swap(agent.runtime.load(manifest, path))


@pytest.fixture
def learner(tmp_path: Path) -> Iterator[Learner]:
    """An agent with learning on (no SuperLink: a buffer, no SuperNode), serving "m" (with a
    trainable head) and "frozen" (without), its cloud a KServe v2 MockTransport."""
    agent = Agent(agent_settings(tmp_path / "agent", federated=True, samples_max=50))
    _serve(agent, tmp_path, model="m", trainable=["head.weight", "head.bias"])
    _serve(agent, tmp_path, model="frozen", trainable=[])
    cloud = Cloud()
    agent.router.cloud = CloudClient(
        "http://cloud.test/", "device-token-123", transport=httpx.MockTransport(cloud.handle),
        breaker=CircuitBreaker(failures=3, reset_s=3600),
    )  # fmt: skip
    api = LocalApi(agent, "127.0.0.1", 0)
    api.start()
    try:
        yield Learner(agent, api.url, cloud)
    finally:
        api.stop()
        assert agent.learning is not None
        agent.learning.stop()
        agent.cloud.close()


def _feedback(url: str, body: Any) -> httpx.Response:
    # json.dumps, not httpx's json=: a NaN must reach the agent as the NaN literal.
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{url}/v1/feedback", content=content, timeout=10)


def _body(rows: list[list[float]], labels: Any, model: str = "m", **extra: Any) -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {
        "model": model, "labels": labels,
        "inputs": [{"name": "input", "shape": [len(rows), 3], "datatype": "FP32", "data": flat}],
        **extra,
    }  # fmt: skip


def test_feedback_is_stored_and_shows_in_telemetry(learner: Learner) -> None:
    r = _feedback(learner.url, _body([[0.1, 0.2, 0.7], [0.5, 0.4, 0.1]], [2, 0]))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model": "m", "version": 1, "stored": 2, "relabelled": 0, "evicted": 0, "buffered": 2
    }  # fmt: skip
    learner.agent.close_telemetry_window()
    window = decode(Telemetry, learner.agent.outbox._pending[-1])
    assert window.learning is not None
    assert (window.learning.samples, window.learning.capacity) == (2, 50)
    assert window.learning.by_source == {"feedback": 2}
    assert window.learning.supernode == "off"
    assert window.counts["samples_feedback"] == 2


def test_rows_the_cloud_answered_are_kept_with_its_label(learner: Learner) -> None:
    """A batch with one hard row: only that row is kept, labelled with the cloud's top
    class (the cloud answers [0, 0, 1]); the easy row and a degraded answer are not."""
    agent = learner.agent
    answer = agent.infer("m", {"input": np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]],
                                                 dtype=np.float32)})  # fmt: skip
    assert answer.cloud_rows == 1
    assert agent.learning is not None
    samples = agent.learning.buffer.load("m")
    np.testing.assert_allclose(samples.inputs["input"], [[0.4, 0.35, 0.25]])
    assert samples.labels.tolist() == [2]
    assert samples.sources == ["cloud"]
    learner.cloud.respond = lambda _request: httpx.Response(503)
    agent.infer("m", {"input": np.array([[0.3, 0.3, 0.4]], dtype=np.float32)})
    assert len(agent.learning.buffer.load("m")) == 1
    agent.infer("frozen", {"input": np.array([[0.3, 0.3, 0.4]], dtype=np.float32)})
    assert len(agent.learning.buffer.load("frozen")) == 0


BAD: list[tuple[Any, int, str]] = [
    (b"{not json", 400, "not JSON"),
    ([1, 2], 400, "JSON object"),
    (_body([[0.1, 0.2, 0.7]], [1], model=""), 400, "'model'"),
    (_body([[0.1, 0.2, 0.7]], [1], model="ghost"), 404, "no model 'ghost'"),
    (_body([[0.1, 0.2, 0.7]], [1], model="frozen"), 409, "no trainable head"),
    (_body([[0.1, 0.2, 0.7]], [1, 2]), 400, "list of 1 class indices"),
    (_body([[0.1, 0.2, 0.7]], [3]), 400, "labels must be in 0..2"),
    (_body([[0.1, 0.2, 0.7]], [-1]), 400, "labels must be in 0..2"),
    (_body([[0.1, 0.2, 0.7]], ["1"]), 400, "integers"),
    (_body([[0.1, 0.2, 0.7]], [True]), 400, "integers"),
    (_body([[0.1, 0.2]], [1]), 400, "values, shape"),
    (_body([[0.1, float("nan"), 0.7]], [1]), 400, "NaN"),
    (_body([[0.1, 0.2, 0.7]], [1], surprise=1), 400, "unknown feedback fields"),
    ({"model": "m", "labels": [1]}, 400, "'inputs'"),
]


def test_bad_feedback_is_a_clear_4xx_and_stores_nothing(learner: Learner) -> None:
    for body, status, message in BAD:
        r = _feedback(learner.url, body)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["error"], (body, r.text)
    assert learner.agent.learning is not None
    assert learner.agent.learning.buffer.stats().samples == 0


def test_feedback_with_learning_off_is_refused(tmp_path: Path) -> None:
    agent = Agent(agent_settings(tmp_path / "agent"))
    _serve(agent, tmp_path, model="m", trainable=["head.weight"])
    api = LocalApi(agent, "127.0.0.1", 0)
    api.start()
    try:
        r = _feedback(api.url, _body([[0.1, 0.2, 0.7]], [2]))
        assert r.status_code == 409
        assert "learning is off" in r.json()["error"]
        assert not (tmp_path / "agent" / "samples.db").exists()
    finally:
        api.stop()
        agent.cloud.close()
