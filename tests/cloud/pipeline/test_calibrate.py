"""Routing calibration: thresholds that meet an offload budget or a share of the gap."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pipeline.calibrate import RoutingTarget, calibrate
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.reference.digits import digits_splits
from shared.errors import InvalidInput
from shared.messages import RoutingPolicy
from shared.routing import confidence, is_hard


def _probs(rng: np.random.Generator, n: int, k: int = 10) -> np.ndarray:
    logits = rng.normal(size=(n, k)) * rng.uniform(0.5, 4, size=(n, 1))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(
    "policy", [RoutingPolicy.MAX_PROB, RoutingPolicy.MARGIN, RoutingPolicy.ENTROPY]
)
def test_confidence_orders_a_certain_answer_above_a_uniform_one(policy: RoutingPolicy) -> None:
    certain = np.array([[0.97, 0.01, 0.01, 0.01]])
    uniform = np.full((1, 4), 0.25)
    assert confidence(certain, policy)[0] > confidence(uniform, policy)[0]
    assert 0.0 <= confidence(uniform, policy)[0] <= 1.0


@pytest.mark.parametrize("budget", [0.05, 0.2, 0.5])
def test_a_budget_target_offloads_at_most_the_budget(budget: float) -> None:
    rng = np.random.default_rng(0)
    probs = _probs(rng, 1000)
    labels = rng.integers(0, 10, 1000)
    result = calibrate(probs, labels, target=RoutingTarget("budget", budget))
    for policy, entry in result["policies"].items():
        offloaded = is_hard(probs, RoutingPolicy(policy), entry["threshold"]).mean()
        assert offloaded == pytest.approx(entry["offload"])
        assert budget - 0.002 <= offloaded <= budget


def test_a_gap_target_recovers_the_share_of_the_gap_on_digits(
    reference_onnx: dict[str, bytes],
) -> None:
    splits = digits_splits(0)
    edge = run_model(
        reference_onnx["digits-edge-weak"], {"input": splits.x_calib}, output="probabilities"
    )
    cloud = run_model(
        reference_onnx["digits-cloud"], {"input": splits.x_calib}, output="probabilities"
    )
    result = calibrate(edge, splits.y_calib, target=RoutingTarget("gap", 0.8), cloud_probs=cloud)
    goal = result["edge_accuracy"] + 0.8 * (result["cloud_accuracy"] - result["edge_accuracy"])
    for entry in result["policies"].values():
        assert entry["accuracy"] >= goal - 1e-9
        assert 0.0 < entry["offload"] < 1.0
    chosen = result["policies"][result["chosen"]]
    assert chosen["offload"] == min(e["offload"] for e in result["policies"].values())
    # Offloading the least confident is far better than offloading at random:
    assert chosen["offload"] < 0.8


def test_bad_targets_are_refused() -> None:
    with pytest.raises(InvalidInput):
        RoutingTarget.parse("coin:0.5")
    with pytest.raises(InvalidInput):
        RoutingTarget.parse("budget:abc")
    with pytest.raises(InvalidInput):
        RoutingTarget("budget", 1.5)
    probs = _probs(np.random.default_rng(1), 10)
    with pytest.raises(InvalidInput, match="cloud model"):
        calibrate(probs, np.zeros(10, dtype=int), target=RoutingTarget("gap", 0.5))


def test_always_policies_need_no_threshold() -> None:
    probs = _probs(np.random.default_rng(2), 5)
    assert not is_hard(probs, RoutingPolicy.ALWAYS_EDGE, None).any()
    assert is_hard(probs, RoutingPolicy.ALWAYS_CLOUD, None).all()
    with pytest.raises(InvalidInput, match="needs a threshold"):
        is_hard(probs, RoutingPolicy.MAX_PROB, None)
