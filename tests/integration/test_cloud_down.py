"""Cloud down, end to end: a real agent whose every input is hard gets its local answers back
flagged ``degraded`` (the cloud refused the connection, or never answered and the latency
budget cut the call), the breaker stops it trying, and once the real inference service is
up on that address the breaker's half-open probe gets a cloud answer and closes it.

The breaker's clock is the test's, so "reset_s later" does not depend on how loaded the
machine is; everything else is real (sockets, uvicorn, the inference service, the agent)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import uvicorn

from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.inference.app import create_inference_app
from cloud.inference.service import InferenceService
from cloud.pipeline.reference.digits import digits_splits
from edge_agent.agent import Agent
from shared.messages import CloudModelRef, RoutingPolicy, RoutingSpec, TensorSpec
from tests.cloud.inference.conftest import enroll, register
from tests.edge_agent.support import agent_settings, manifest_for

X = digits_splits(0).x_test[:3].astype(np.float32)
# Every row is hard (no probability reaches 1.01); the cloud model is pinned.
ALL_HARD = RoutingSpec(
    policy=RoutingPolicy.MAX_PROB,
    threshold=1.01,
    cloud_model=CloudModelRef(name="digits-cloud", version=1),
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _agent(tmp_path: Path, context: CloudContext, data: bytes, port: int, clock: Clock) -> Agent:
    agent = Agent(
        agent_settings(
            tmp_path / "agent",
            token=enroll(context, "cam-down"),
            device_id="cam-down",
            cloud_url=f"http://127.0.0.1:{port}",
            cloud_budget_s=0.3,
            cloud_breaker_failures=2,
            cloud_breaker_reset_s=10.0,
        )
    )
    agent.cloud.breaker.clock = clock
    path = tmp_path / "edge.onnx"
    path.write_bytes(data)
    manifest = manifest_for(
        data,
        model="digits-edge",
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        routing=ALL_HARD,
    )
    agent.runtime.swap(agent.runtime.load(manifest, path))
    agent.start(serve_api=False)  # its broker is a port nobody listens on: not needed here
    return agent


@contextmanager
def _serving_on(context: CloudContext, port: int) -> Iterator[InferenceService]:
    """The inference service on uvicorn, on exactly ``port`` (where the agent looks)."""
    service = InferenceService(context)
    server = uvicorn.Server(
        uvicorn.Config(
            create_inference_app(context, service), host="127.0.0.1", port=port,
            log_level="warning",
        )
    )  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield service
    finally:
        server.should_exit = True
        thread.join(10)
        service.close()


@contextmanager
def _black_hole() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


@pytest.fixture
def edge(context: CloudContext, reference_onnx: dict[str, bytes]) -> bytes:
    register(context, "digits-cloud", reference_onnx["digits-cloud"])
    return reference_onnx["digits-edge"]


def _reasons(agent: Agent, calls: int) -> list[str | None]:
    reasons = []
    local = agent.runtime.get("digits-edge").run({"input": X})["probabilities"]
    for _ in range(calls):
        answer = agent.infer("digits-edge", {"input": X})
        assert (answer.source, answer.degraded, answer.hard_rows) == ("edge", True, 3)
        np.testing.assert_array_equal(answer.outputs["probabilities"], local)
        reasons.append(answer.reason)
    return reasons


def test_refused_then_the_half_open_probe_reaches_the_cloud_that_came_back(
    tmp_path: Path, context: CloudContext, edge: bytes
) -> None:
    clock = Clock()
    port = free_port()
    agent = _agent(tmp_path, context, edge, port, clock)
    try:
        assert _reasons(agent, 3) == [
            "hard input, cloud failed: ConnectError",
            "hard input, cloud failed: ConnectError",
            "hard input, cloud circuit open",
        ]
        with _serving_on(context, port) as service:
            # Loaded, as a client's ready call leaves it: the trial call below must not pay
            # the first load within the agent's 0.3 s budget (it did not, under load).
            service.model_ready(service.resolve("digits-cloud", "1"))
            clock.now += 9.9  # the cloud is back, but the breaker does not know yet
            assert _reasons(agent, 1) == ["hard input, cloud circuit open"]
            metric = service.metrics.registry.get_sample_value
            labels = {"model": "digits-cloud", "version": "1"}
            assert metric("nv_inference_request_success_total", labels) is None
            clock.now += 0.1  # reset_s after it opened: one trial call
            answer = agent.infer("digits-edge", {"input": X})
            assert (answer.source, answer.degraded, answer.version) == ("cloud", False, 1)
            assert not agent.cloud.breaker.open
            again = agent.infer("digits-edge", {"input": X})
            assert (again.source, again.degraded) == ("cloud", False)
            assert metric("nv_inference_request_success_total", labels) == 2
        totals = agent.meter.totals
        assert (totals["rows_hard"], totals["rows_degraded"], totals["rows_cloud"]) == (18, 12, 6)
    finally:
        agent.stop()


def test_a_cloud_that_never_answers_is_cut_by_the_budget_then_skipped(
    tmp_path: Path, context: CloudContext, edge: bytes
) -> None:
    """No answer at all: each of the first two calls ends at the 0.3 s budget (the app gets
    the local answer, degraded), then the breaker is open and no call waits."""
    with _black_hole() as port:
        agent = _agent(tmp_path, context, edge, port, Clock())
        try:
            assert _reasons(agent, 3) == [
                "hard input, cloud failed: DeadlineExceeded",
                "hard input, cloud failed: DeadlineExceeded",
                "hard input, cloud circuit open",
            ]
            assert agent.cloud.breaker.open
        finally:
            agent.stop()
