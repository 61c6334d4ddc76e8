"""Routing calibration: thresholds that meet an offload budget or a share of the gap, the
curve a device follows, and the learned router."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.pipeline.calibrate import RoutingTarget, calibrate, offload_curve, threshold_for_share
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.learned_router import train_learned_router
from cloud.pipeline.reference.digits import digits_splits
from shared.errors import InvalidInput
from shared.messages import LearnedRouter, RoutingPolicy
from shared.routing import (
    confidence,
    is_hard,
    learned_confidence,
    router_features,
    threshold_for_budget,
)


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
    result = calibrate(probs, labels, target=RoutingTarget("budget", budget), learned=False).report
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
    result = calibrate(
        edge, splits.y_calib, target=RoutingTarget("gap", 0.8), cloud_probs=cloud
    ).report
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


def _digits_scores(
    models: dict[str, bytes], edge: str, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    splits = digits_splits(0)
    x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    probs = run_model(models[edge], {"input": x}, output="probabilities")
    embedding = run_model(models[edge], {"input": x}, output="embedding")
    cloud = run_model(models["digits-cloud"], {"input": x}, output="probabilities")
    return probs, embedding, cloud, y


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.3])
def test_a_budget_set_on_the_calibration_split_lands_within_3_points_on_the_test_split(
    reference_onnx: dict[str, bytes], budget: float
) -> None:
    """The threshold and the curve's point for the budget agree, and both hold on new data."""
    probs, embedding, cloud, y = _digits_scores(reference_onnx, "digits-edge-weak", "calib")
    found = calibrate(
        probs, y, target=RoutingTarget("budget", budget), cloud_probs=cloud, embedding=embedding
    )
    test_probs, test_embedding, _cloud, _y = _digits_scores(
        reference_onnx, "digits-edge-weak", "test"
    )
    for policy in ("max_prob", "margin", "entropy"):
        threshold = found.threshold(policy)
        assert threshold_for_budget(found.curves[policy], budget) == pytest.approx(
            threshold, abs=1e-3
        )
        offload = is_hard(test_probs, RoutingPolicy(policy), threshold).mean()
        assert abs(offload - budget) <= 0.03, (policy, offload)
    assert found.learned is not None
    learned = learned_confidence(found.learned.router, test_probs, test_embedding)
    assert abs((learned < found.threshold("learned")).mean() - budget) <= 0.03


def test_a_curve_has_21_points_from_no_offload_to_all() -> None:
    conf = np.random.default_rng(3).random(200)
    curve = offload_curve(conf)
    assert len(curve) == 21
    assert [p.offload for p in curve] == pytest.approx(np.linspace(0, 1, 21).tolist())
    for point in curve:
        assert (conf < point.threshold).mean() == pytest.approx(point.offload, abs=1 / 200)
    assert threshold_for_share(conf, 0.35) == pytest.approx(threshold_for_budget(curve, 0.35))


def test_the_learned_router_decides_in_numpy_as_scikit_learn_does(
    reference_onnx: dict[str, bytes],
) -> None:
    """Trained on the calibration split, shipped as plain lists, applied with numpy on the
    test split: the same rows are hard as scikit-learn's own model says."""
    from sklearn.linear_model import LogisticRegression

    probs, embedding, cloud, y = _digits_scores(reference_onnx, "digits-edge-weak", "calib")
    trained = train_learned_router(probs, y, cloud_probs=cloud, embedding=embedding)
    assert trained is not None
    router = LearnedRouter.model_validate_json(trained.router.model_dump_json())  # as shipped
    gain = (probs.argmax(axis=1) != y) & (cloud.argmax(axis=1) == y)
    features = router_features(probs, embedding if trained.uses_embedding else None)
    mean, scale = np.array(router.mean), np.array(router.scale)
    reference = LogisticRegression(C=trained.c, max_iter=2000).fit((features - mean) / scale, gain)

    test_probs, test_embedding, _cloud, _y = _digits_scores(
        reference_onnx, "digits-edge-weak", "test"
    )
    test_features = router_features(test_probs, test_embedding if trained.uses_embedding else None)
    sklearn_gain = reference.predict_proba((test_features - mean) / scale)[:, 1]
    numpy_conf = learned_confidence(router, test_probs, test_embedding)

    np.testing.assert_allclose(numpy_conf, 1 - sklearn_gain, atol=1e-9)
    for threshold in (0.5, 0.8, 0.95):
        assert ((numpy_conf < threshold) == (sklearn_gain > 1 - threshold)).all()


def test_too_few_rows_to_learn_from_give_no_learned_router() -> None:
    probs = _probs(np.random.default_rng(4), 50)
    labels = probs.argmax(axis=1)  # the edge is always right: nothing to learn
    assert train_learned_router(probs, labels) is None
    found = calibrate(probs, labels, target=RoutingTarget("budget", 0.1))
    assert "learned" not in found.report["policies"]
