"""Backpressure end to end: saturate the cloud; the agents' offload rate drops to within the
budget the cloud publishes; it recovers when the load stops.

Real parts: the inference service on uvicorn serving digits-cloud, its budget loop on the
embedded Redis and rumqttd broker, and two real `Agent`s running digits-edge with a
calibrated routing spec and its curve. The cloud is made deterministically slow (every
batch of one takes 50 ms more: 20 requests/s at most), so eight offloading threads saturate
it whatever the machine does. Assertions are on counters and published messages, never on
timings."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest

from cloud.context import CloudContext
from cloud.inference.budget import BudgetLoop, budget_loop_for
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine, open_engine
from cloud.pipeline.calibrate import RoutingTarget, calibrate
from cloud.pipeline.reference.digits import digits_splits
from edge_agent.agent import Agent
from shared import topics
from shared.messages import (
    CloudBudget,
    CloudModelRef,
    RoutingPolicy,
    RoutingSpec,
    TensorSpec,
    budget_payload,
    read_budget,
)
from shared.routing import threshold_for_budget
from tests.cloud.inference.conftest import RunningInference, enroll, register, serving
from tests.edge_agent.support import agent_settings, manifest_for
from tests.fleet_harness import wait_for

SPLITS = digits_splits(0)
DELAY_S = 0.05
THREADS_PER_AGENT = 4
FLOOR = 0.02
BUDGET_SETTINGS: dict[str, Any] = {
    "inference_max_batch_size": 1,
    "inference_max_queue_delay_ms": 0.0,
    "inference_providers": ["CPUExecutionProvider"],
    "inference_threads": 1,
    "inference_budget_queue_ms": 20.0,
    "inference_budget_hold_s": 0.3,
    "inference_budget_relax_s": 0.6,
    "inference_budget_ttl_s": 10.0,
    "inference_budget_interval_s": 0.1,
    "inference_budget_min": FLOOR,
}


class _Slow(Engine):
    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        time.sleep(DELAY_S)
        return super().run(inputs)


def _slow_engine(context: CloudContext) -> Any:
    def open_(info: VersionInfo) -> Engine:
        path = context.artifacts.path(info.sha256)
        return _Slow(open_engine(path, providers=["CPUExecutionProvider"], threads=1).session)

    return open_


@dataclass
class Observer:
    """A client of the broker that keeps every budget published (None: the empty one)."""

    url: str
    seen: list[CloudBudget | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        host, port = self.url.removeprefix("mqtt://").split(":")
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"observer-{uuid.uuid4().hex[:6]}"
        )
        subscribed = threading.Event()
        self.client.on_message = lambda _c, _u, m: self.seen.append(read_budget(m.payload))
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topics.CLOUD_BUDGET, 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        assert subscribed.wait(10), "the observer could not subscribe"

    def publish_retained(self, payload: bytes) -> None:
        self.client.publish(topics.CLOUD_BUDGET, payload, qos=1, retain=True).wait_for_publish(5)

    def shares(self) -> list[float | None]:
        return [None if b is None else b.max_offload for b in self.seen]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def routing(reference_onnx: dict[str, bytes]) -> RoutingSpec:
    """digits-edge calibrated to offload 30 % of the calibration split, with its curve."""
    session = ort.InferenceSession(
        reference_onnx["digits-edge"], providers=["CPUExecutionProvider"]
    )
    probs = session.run(["probabilities"], {"input": SPLITS.x_calib.astype(np.float32)})[0]
    found = calibrate(probs, SPLITS.y_calib, target=RoutingTarget("budget", 0.3), learned=False)
    return RoutingSpec(
        policy=RoutingPolicy.MAX_PROB,
        threshold=found.threshold("max_prob"),
        curve=found.curves["max_prob"],
        cloud_model=CloudModelRef(name="digits-cloud", version=1),
    )


@pytest.fixture
def inference(
    context: CloudContext, reference_onnx: dict[str, bytes]
) -> Iterator[RunningInference]:
    register(context, "digits-cloud", reference_onnx["digits-cloud"])
    with serving(context, engine=_slow_engine(context), **BUDGET_SETTINGS) as running:
        yield running


@pytest.fixture
def loop(inference: RunningInference) -> Iterator[BudgetLoop]:
    service = inference.service
    loop = budget_loop_for(inference.context, service.metrics, service.pool)
    assert loop is not None
    loop.start()
    yield loop
    loop.stop()


def _agent(
    tmp_path: Path, inference: RunningInference, routing: RoutingSpec, data: bytes, name: str
) -> Agent:
    settings = agent_settings(
        tmp_path / name,
        device_id=name,
        token=enroll(inference.context, name),
        cloud_url=inference.url,
        mqtt_url=inference.context.urls.mqtt_url,
        cloud_budget_s=5.0,  # the cloud's queue is what is measured, not the agent's deadline
        cloud_breaker_failures=1000,
    )
    agent = Agent(settings)
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(data)
    manifest = manifest_for(
        data,
        model="digits-edge",
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        routing=routing,
    )
    agent.runtime.swap(agent.runtime.load(manifest, path))
    agent.start(serve_api=False)
    wait_for(lambda: agent.link.wait_subscribed(0.1), 15, f"{name} subscribed")
    return agent


@pytest.fixture
def agents(
    tmp_path: Path,
    inference: RunningInference,
    routing: RoutingSpec,
    reference_onnx: dict[str, bytes],
) -> Iterator[list[Agent]]:
    started = [
        _agent(tmp_path, inference, routing, reference_onnx["digits-edge"], f"bp-{i}")
        for i in range(2)
    ]
    yield started
    for agent in started:
        agent.stop()


class Load:
    """THREADS_PER_AGENT threads per agent sending one test digit at a time, flat out."""

    def __init__(self, agents: list[Agent]) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.threads = [
            threading.Thread(target=self._send, args=(agent, k), daemon=True)
            for agent in agents
            for k in range(THREADS_PER_AGENT)
        ]
        for thread in self.threads:
            thread.start()

    def _send(self, agent: Agent, k: int) -> None:
        x = SPLITS.x_test.astype(np.float32)
        i = k * 37
        while not self.stop.is_set():
            try:
                agent.infer("digits-edge", {"input": x[i % len(x) : i % len(x) + 1]})
            except Exception as exc:
                self.errors.append(repr(exc))
            i += 1

    def end(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def _stable_window(agent: Agent, rows: int) -> tuple[float, int, int]:
    """(share, rows, hard) over at least ``rows`` rows during which the share in force did not
    change; tried again if it did."""
    deadline = time.monotonic() + 60
    totals = agent.meter.totals  # lifetime counters, updated in place
    while time.monotonic() < deadline:
        budget, generation = agent.budget.current(), agent.budget.generation
        start = (totals["rows_total"], totals["rows_hard"])

        def enough(start: tuple[int, int] = start) -> bool:
            return totals["rows_total"] - start[0] >= rows

        wait_for(enough, 30, f"{rows} rows")
        if budget is not None and agent.budget.generation == generation:
            return (
                budget.max_offload,
                totals["rows_total"] - start[0],
                totals["rows_hard"] - start[1],
            )
    raise AssertionError("the budget never held still for a window")


def test_a_saturated_cloud_cuts_the_agents_offload_to_its_budget_and_it_recovers(
    context: CloudContext,
    inference: RunningInference,
    loop: BudgetLoop,
    agents: list[Agent],
    routing: RoutingSpec,
    reference_onnx: dict[str, bytes],
) -> None:
    """Unbudgeted, the agents offload about 30 % of the test digits. Saturated, the cloud
    publishes a budget and cuts it (how far depends on how the machine keeps up: not
    asserted); each agent's offload over a window with one budget in force stays within it,
    give or take the one burst its credit allows and the calls already in flight when the
    window began. Without load the budget relaxes step by step and is cleared; the agents
    route with their calibrated threshold again: exactly the rows below it go to the
    cloud."""
    assert routing.threshold is not None
    session = ort.InferenceSession(
        reference_onnx["digits-edge"], providers=["CPUExecutionProvider"]
    )
    x = SPLITS.x_test.astype(np.float32)
    confidences = session.run(["probabilities"], {"input": x})[0].max(axis=1)
    natural = float((confidences < routing.threshold).mean())
    assert natural > 0.2
    observer = Observer(context.urls.mqtt_url)
    try:
        load = Load(agents)
        try:
            wait_for(
                lambda: loop.state is not None and loop.state.max_offload <= natural / 4,
                60,
                "a budget under a quarter of the natural offload",
            )
            for agent in agents:
                wait_for(lambda a=agent: a.budget.current() is not None, 10, "the budget")
            for agent in agents:
                share, rows, hard = _stable_window(agent, 600)
                slack = max(1.0, share * 20) + 1 + THREADS_PER_AGENT
                assert hard <= share * rows + slack, (agent.device_id, share, rows, hard)
                assert hard < natural * rows / 2
                report = agent.budget.report(agent.router.specs())
                assert report is not None
                assert report.following == ["digits-edge"]
            assert agents[0].meter.totals["rows_over_budget"] > 0
        finally:
            load.end()
        assert load.errors == []
        wait_for(lambda: observer.seen and observer.seen[-1] is None, 60, "the budget cleared")
        for agent in agents:
            wait_for(lambda a=agent: a.budget.current() is None, 10, "agents told")
        shares = observer.shares()
    finally:
        observer.close()
    published = [s for s in shares if s is not None]
    lowest = published.index(min(published))
    assert published[: lowest + 1] == sorted(published[: lowest + 1], reverse=True)
    assert published[lowest:] == sorted(published[lowest:])
    assert len(published) - lowest >= 3  # relaxed in steps, not at once
    assert FLOOR <= min(published) <= natural / 4
    assert loop.store.read() is None
    assert inference.metric("edgefleet_inference_offload_budget") == 1.0
    assert inference.metric("edgefleet_inference_budget_changes_total", change="relax") >= 2
    agent = agents[0]
    before = agent.meter.totals["rows_hard"]
    answer = agent.infer("digits-edge", {"input": x[:60]})
    assert answer.hard_rows == int((confidences[:60] < routing.threshold).sum()) > 60 * 0.1
    assert answer.over_budget_rows == 0
    assert agent.meter.totals["rows_hard"] - before == answer.hard_rows
    assert answer.cloud_rows == answer.hard_rows  # the cloud answers them again


def test_under_a_middle_budget_the_agent_moves_its_threshold_along_the_curve(
    context: CloudContext,
    inference: RunningInference,
    agents: list[Agent],
    routing: RoutingSpec,
) -> None:
    """A budget of 10 %, retained (no loop runs): the agent's threshold is the curve's for
    10 %, not its calibrated one. On the calibration digits (what the curve was measured
    on), one at a time, it offloads about 10 %, and only rows under that threshold: a
    threshold left at the calibrated one would send whichever hard row (under the
    calibrated threshold) comes when the credit allows, confident ones included. The rows
    hard under the calibrated threshold that stayed local are counted as over budget."""
    assert routing.threshold is not None
    agent = agents[0]
    observer = Observer(context.urls.mqtt_url)
    try:
        observer.publish_retained(
            budget_payload(CloudBudget(max_offload=0.1, reason="held", until=_in(600)))
        )
        wait_for(lambda: agent.budget.current() is not None, 10, "the budget")
        expected = min(routing.threshold, threshold_for_budget(routing.curve, 0.1))
        assert expected < routing.threshold
        assert agent.budget.threshold(routing) == pytest.approx(expected)
        x = SPLITS.x_calib.astype(np.float32)
        routes = [
            agent.infer("digits-edge", {"input": x[i : i + 1]}).rows[0] for i in range(len(x))
        ]
    finally:
        observer.publish_retained(b"")
        observer.close()
    sent = [r for r in routes if r.source == "cloud"]
    assert len(sent) == sum(r.hard for r in routes)  # the cloud answered every one sent
    assert all(r.confidence is not None and r.confidence < expected for r in sent)
    assert 0.05 * len(x) <= len(sent) <= 0.1 * len(x) + max(1.0, 0.1 * 20)
    natural = [r for r in routes if r.confidence is not None and r.confidence < routing.threshold]
    assert sum(r.over_budget for r in routes) == len(natural) - len(sent)


def test_a_budget_a_dead_cloud_left_retained_is_cleared_by_the_next_one(
    context: CloudContext, inference: RunningInference
) -> None:
    """A budget is retained on the broker, and Redis holds none (the cloud that set it died
    long ago): the next replica's loop clears it as it starts."""
    observer = Observer(context.urls.mqtt_url)
    try:
        left = CloudBudget(max_offload=0.1, reason="left behind", until=_in(3600))
        observer.publish_retained(budget_payload(left))
        wait_for(lambda: observer.seen == [left], 10, "the leftover")
        service = inference.service
        loop = budget_loop_for(inference.context, service.metrics, service.pool)
        assert loop is not None
        loop.start()
        try:
            wait_for(lambda: observer.seen[-1:] == [None], 10, "the clear")
        finally:
            loop.stop()
    finally:
        observer.close()
    late = Observer(context.urls.mqtt_url)
    time.sleep(0.5)
    late.close()
    assert late.seen == []  # nothing retained any more


def _in(seconds: float) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) + timedelta(seconds=seconds)
