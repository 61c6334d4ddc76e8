"""The agent reports what its runtime serves: a model the store points at but that does not
load at start is neither served nor reported active (the cloud must not count it ACTIVE)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.agent import Agent
from edge_agent.model_store import Installed, ModelStore
from shared.messages import CurvePoint, RoutingPolicy, RoutingSpec, SecondOpinion
from tests.edge_agent.support import agent_settings, manifest_for, put_blob, tiny_classifier


def _install(
    data_dir: Path, data: bytes, *, model: str, routing: RoutingSpec | None = None
) -> None:
    """What a deployment left on disk: a verified blob, activated in the store."""
    store = ModelStore(data_dir / "store")
    manifest = manifest_for(data, model=model, version=4, routing=routing)
    put_blob(store, data, manifest.artifact)
    store.activate(Installed(manifest))
    store.set_rev_applied(9)


def test_a_stored_model_that_does_not_load_is_not_reported_active(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent"
    _install(data_dir, tiny_classifier(seed=1), model="good")
    # Its bytes match the manifest's hash (the store verifies that), but onnxruntime cannot
    # load them: say the agent was upgraded to an onnxruntime that refuses this opset.
    _install(data_dir, b"not a graph onnxruntime can load " * 40, model="broken")
    agent = Agent(agent_settings(data_dir))
    agent.start(serve_api=False)
    try:
        assert set(agent.store.state.active) == {"good", "broken"}
        reported = agent.reported()
        assert reported.active == {"good": 4}
        assert reported.rev_applied == 9
        assert agent.meter.totals["load_failures"] == 1
        assert 'edgefleet_agent_active_version{model="broken"}' not in agent.prometheus()
    finally:
        agent.stop()


def test_an_agent_never_started_stops_cleanly(tmp_path: Path) -> None:
    """A supervisor that builds an agent and then gives up before start (a bad config found
    later, a signal) still calls stop: it must not raise on threads that never ran."""
    agent = Agent(agent_settings(tmp_path / "agent"))
    agent.stop()
    agent.stop()  # and twice is harmless


def test_routing_without_its_second_opinion_is_counted_in_telemetry(tmp_path: Path) -> None:
    """The manifest's second opinion reads an input the model does not have: every answer
    is still given (routed by max_prob: every row of this spec is hard, and without a cloud
    it is the local one, degraded) and the telemetry window counts each such call."""
    curve = [CurvePoint(offload=0.0, threshold=0.0), CurvePoint(offload=1.0, threshold=1.0)]
    opinion = SecondOpinion(
        input="pixels", weights=[0.0] * 12, bias=[0.0] * 3, alpha=0.5, knots=[0.0, 1.0]
    )
    routing = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=1.01, curve=curve, second_opinion=opinion
    )
    data_dir = tmp_path / "agent"
    _install(data_dir, tiny_classifier(seed=1), model="good", routing=routing)
    agent = Agent(agent_settings(data_dir))
    agent.start(serve_api=False)
    try:
        for _ in range(2):
            answer = agent.infer("good", {"input": np.ones((2, 4), dtype=np.float32)})
            assert answer.hard_rows == 2
            assert answer.degraded
        assert agent.meter.totals["routing_fallback"] == 2
        assert agent.meter.snapshot({}).counts["routing_fallback"] == 2
    finally:
        agent.stop()
