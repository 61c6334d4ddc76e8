"""The demo's traffic driver: its mix of digits (some made hard), and its numbers checked
against a real agent (local API over HTTP, digits-edge routing to the real inference service
serving digits-cloud): rows, offloaded, cloud and degraded answers as the agent counts them,
accuracy as computed here from the two models directly."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cloud.context import CloudContext
from cloud.demo.session import DemoSession
from cloud.demo.traffic import Tally, Traffic, budget_line, digits_mix, edge_predictions, rotate
from cloud.embedded.processes import free_port
from cloud.inference.budget_store import STATE_KEY
from cloud.pipeline.calibrate import RoutingTarget, calibrate
from cloud.pipeline.reference.digits import digits_splits
from edge_agent.agent import Agent
from shared.messages import CloudModelRef, RoutingPolicy, RoutingSpec, TensorSpec
from tests.cloud.inference.conftest import RunningInference, enroll, register, serving
from tests.edge_agent.support import agent_settings, manifest_for


def _probabilities(data: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"input": x.astype(np.float32)})[0])


def test_a_share_of_the_mix_is_made_hard_and_the_edge_finds_it_so(
    reference_onnx: dict[str, bytes],
) -> None:
    mix = digits_mix(hard_share=0.3)
    held_out = digits_splits(0)
    assert len(mix.x) == len(held_out.x_test)
    assert sorted(mix.y.tolist()) == sorted(held_out.y_test.tolist())
    kinds = np.array(mix.kinds)
    assert 0.2 < float((kinds != "clean").mean()) < 0.4
    assert {"noisy", "rotated"} <= set(mix.kinds)
    assert mix.x.min() >= 0
    assert mix.x.max() <= 16
    confidence = _probabilities(reference_onnx["digits-edge"], mix.x).max(axis=1)
    assert confidence[kinds != "clean"].mean() < confidence[kinds == "clean"].mean()
    image = np.arange(64, dtype=np.float32).reshape(8, 8)
    assert np.array_equal(rotate(image, 0), image)
    assert np.array_equal(rotate(image, 90), np.rot90(image))
    with pytest.raises(ValueError, match="share"):
        digits_mix(hard_share=1.5)


@pytest.fixture
def inference(
    context: CloudContext, reference_onnx: dict[str, bytes]
) -> Iterator[RunningInference]:
    register(context, "digits-cloud", reference_onnx["digits-cloud"])
    with serving(context, inference_providers=["CPUExecutionProvider"]) as running:
        yield running


@pytest.fixture
def routing(reference_onnx: dict[str, bytes]) -> RoutingSpec:
    splits = digits_splits(0)
    probs = _probabilities(reference_onnx["digits-edge"], splits.x_calib)
    found = calibrate(probs, splits.y_calib, target=RoutingTarget("budget", 0.15), learned=False)
    return RoutingSpec(
        policy=RoutingPolicy.MAX_PROB,
        threshold=found.threshold("max_prob"),
        curve=found.curves["max_prob"],
        cloud_model=CloudModelRef(name="digits-cloud", version=1),
    )


@pytest.fixture
def agent(
    tmp_path: Path,
    inference: RunningInference,
    routing: RoutingSpec,
    reference_onnx: dict[str, bytes],
) -> Iterator[Agent]:
    data = reference_onnx["digits-edge"]
    path = tmp_path / "edge.onnx"
    path.write_bytes(data)
    agent = Agent(
        agent_settings(
            tmp_path / "agent",
            device_id="demo-traffic-1",
            token=enroll(inference.context, "demo-traffic-1"),
            cloud_url=inference.url,
            cloud_budget_s=10.0,
        )
    )
    manifest = manifest_for(
        data,
        model="digits-edge",
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        routing=routing,
    )
    agent.runtime.swap(agent.runtime.load(manifest, path))
    agent.start(serve_api=True)
    yield agent
    agent.stop()


def test_the_traffic_numbers_are_the_agent_s_and_the_models(
    tmp_path: Path,
    agent: Agent,
    routing: RoutingSpec,
    reference_onnx: dict[str, bytes],
) -> None:
    """60 requests of 4 rows: the driver's rows, offloaded, cloud and degraded counts are the
    agent's own; its joint accuracy is the edge's answer for easy rows and the cloud's for
    hard ones; its edge-only accuracy the edge model's alone."""
    assert agent.api is not None
    mix = digits_mix(hard_share=0.3)
    path = tmp_path / "edge-only.onnx"
    path.write_bytes(reference_onnx["digits-edge"])
    traffic = Traffic([agent.api.url], mix, say=print, batch=4, edge=edge_predictions(path, mix.x))
    total = Tally()
    try:
        for start in range(0, 240, 4):
            total.add(traffic.send(agent.api.url, start))
    finally:
        traffic.stop()
    counted = agent.meter.totals
    assert (total.requests, total.rows, total.errors) == (60, 240, 0)
    assert (total.offloaded, total.cloud, total.degraded) == (
        counted["rows_hard"],
        counted["rows_cloud"],
        counted["rows_degraded"],
    )
    sent, labels = mix.x[:240], mix.y[:240]
    edge = _probabilities(reference_onnx["digits-edge"], sent)
    cloud = _probabilities(reference_onnx["digits-cloud"], sent).argmax(axis=1)
    assert routing.threshold is not None
    hard = edge.max(axis=1) < routing.threshold
    assert total.offloaded == total.cloud == int(hard.sum()) > 24
    assert total.degraded == 0
    joint = np.where(hard, cloud, edge.argmax(axis=1))
    assert total.correct == int((joint == labels).sum())
    assert (total.edge_scored, total.edge_correct) == (240, int((edge.argmax(1) == labels).sum()))
    assert total.correct > total.edge_correct  # the cloud answers what the edge gets wrong
    line = total.line(12.0, "none")
    offload = 100 * total.offloaded / 240
    assert line.startswith(f"traffic 12s: 240 rows, offload {offload:.1f}%, cloud answers ")
    assert f"accuracy edge-only {100 * total.edge_correct / 240:.1f}% vs joint" in line


def test_an_agent_that_does_not_answer_is_a_counted_error_and_the_lines_go_on(
    context: CloudContext, agent: Agent
) -> None:
    """One URL is dead: its requests count as failed, the other agent's rows go on, and the
    driver's thread says its line every interval, the cloud's budget in it."""
    assert agent.api is not None
    lines: list[str] = []
    said = threading.Event()

    def say(line: str) -> None:
        lines.append(line)
        said.set()

    context.redis.set(
        STATE_KEY,
        '{"max_offload": 0.2, "reason": "queue", "until": 4e9, "since": 0, "changed_at": 0}',
    )
    dead = f"http://127.0.0.1:{free_port()}"
    traffic = Traffic(
        [agent.api.url, dead], digits_mix(), say=say, budget=budget_line(context.redis),
        rate=200, batch=2, interval_s=0.5,
    )  # fmt: skip
    traffic.start()
    try:
        assert said.wait(30), "no traffic line"
    finally:
        traffic.stop()
    assert traffic.total.errors >= 1
    assert traffic.total.rows >= 2
    assert "budget 20.0% (queue)" in lines[0]
    assert "failed request(s)" in lines[0]
    assert "edge-only n/a" in lines[0]


def test_the_demo_starts_no_traffic_when_told_none(context: CloudContext) -> None:
    session = DemoSession(0, say=print, banner=lambda *_: None, traffic=0)
    session.stop()
    assert session.traffic is None
