"""The second opinion in the pipeline: trained on the calibration split's class labels,
chosen when it meets the target with less offload, shipped on its fallback policy's scale so
that old and new agents read one threshold and one curve."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cloud.pipeline.calibrate import (
    SECOND_OPINION,
    Calibration,
    RoutingTarget,
    calibrate,
    routing_spec,
)
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.learned_router import gain_area
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.second_opinion import train_second_opinion
from shared.messages import RoutingPolicy, RoutingSpec, decode
from shared.routing import confidence, spec_confidence, threshold_for_budget
from shared.second_opinion import agreement, on_curve, second_opinion_log_probabilities


def _outputs(models: dict[str, bytes], split: str) -> dict[str, np.ndarray]:
    s = digits_splits(0)
    x = getattr(s, f"x_{split}")
    return {
        "x": x,
        "y": getattr(s, f"y_{split}"),
        "edge": run_model(models["digits-edge-weak"], {"input": x}, output="probabilities"),
        "cloud": run_model(models["digits-cloud"], {"input": x}, output="probabilities"),
    }


def _calibrated(cal: dict[str, np.ndarray], target: RoutingTarget) -> Calibration:
    """Calibration on ``cal`` with the cloud's answers and the inputs (so a second opinion
    can be trained)."""
    return calibrate(
        cal["edge"], cal["y"], target=target, cloud_probs=cal["cloud"], inputs=cal["x"]
    )


@pytest.fixture(scope="module")
def weak(reference_onnx: dict[str, bytes]) -> dict[str, dict[str, np.ndarray]]:
    return {split: _outputs(reference_onnx, split) for split in ("calib", "test")}


def test_on_the_weak_edge_it_meets_the_gap_target_with_far_less_offload(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    """Chosen at gap:0.8; shipped beside the best plain policy, whose threshold and curve it
    uses: a device offloads exactly the rows calibration picked, an agent without the field
    about as many, by the plain policy."""
    cal = weak["calib"]
    found = _calibrated(cal, RoutingTarget("gap", 0.8))
    policies = found.report["policies"]
    assert found.chosen == SECOND_OPINION
    plain = found.fallback
    assert plain in ("max_prob", "margin", "entropy", "learned")
    assert policies[SECOND_OPINION]["offload"] < 0.7 * policies[plain]["offload"]
    assert found.report[SECOND_OPINION]["out_of_fold_accuracy"] > 0.9

    name, spec = routing_spec(found, target="gap:0.8")
    spec = RoutingSpec.model_validate_json(spec.model_dump_json())  # as a device reads it
    assert name == SECOND_OPINION
    assert spec.policy is RoutingPolicy(plain)
    assert spec.second_opinion is not None
    assert spec.curve == found.curves[plain]
    assert spec.threshold is not None
    # The knots keep the order: the device's comparison on the curve's scale picks the rows
    # the shipped model's own confidence picks against the calibrated threshold.
    outputs = {"probabilities": cal["edge"]}
    device = spec_confidence(spec, outputs, {"input": cal["x"]}) < spec.threshold
    log_probs = second_opinion_log_probabilities(spec.second_opinion, cal["x"])
    raw = agreement(cal["edge"], log_probs, spec.second_opinion.alpha)
    assert (device == (raw < found.threshold(SECOND_OPINION))).all()
    assert 0 < device.sum() < len(device)
    # An agent without the field: the plain policy at the moved threshold offloads the
    # calibration rows within one step of the curve of what the second opinion offloads.
    old_agent = spec_confidence(spec, outputs) < spec.threshold
    assert abs(old_agent.mean() - policies[SECOND_OPINION]["offload"]) <= 0.05


def test_on_new_rows_it_ranks_the_weak_edge_s_mistakes_far_better_than_entropy(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    """The area under accuracy-vs-offload on the test split: the shipped model's ranking
    against entropy's, both on rows neither was fitted to."""
    cal, test = weak["calib"], weak["test"]
    trained = train_second_opinion(cal["edge"], cal["y"], cal["x"], cloud_probs=cal["cloud"])
    assert trained is not None
    opinion = trained.opinion([0.0, 1.0])
    mine = agreement(
        test["edge"], second_opinion_log_probabilities(opinion, test["x"]), opinion.alpha
    )
    edge_ok = test["edge"].argmax(axis=1) == test["y"]
    cloud_ok = test["cloud"].argmax(axis=1) == test["y"]
    entropy = confidence(test["edge"], RoutingPolicy.ENTROPY)
    gap = cloud_ok.mean() - edge_ok.mean()
    assert gain_area(mine, edge_ok, cloud_ok) > gain_area(entropy, edge_ok, cloud_ok) + 0.04 * gap


def test_a_device_following_a_budget_on_the_shipped_curve_lands_on_the_shipped_threshold(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    """One curve serves both rankers: the threshold the pipeline sets for a budget of 0.2 is
    the one a device reads off the shipped curve for 0.2 (what the cloud's budget does)."""
    cal = weak["calib"]
    found = _calibrated(cal, RoutingTarget("budget", 0.2))
    name, spec = routing_spec(found)  # at equal offload, the most accurate
    assert name == SECOND_OPINION
    assert spec.threshold is not None
    assert threshold_for_budget(spec.curve, 0.2) == pytest.approx(spec.threshold)
    assert found.report["policies"][SECOND_OPINION]["offload"] == pytest.approx(0.2, abs=0.003)


def test_a_policy_asked_for_ships_without_the_second_opinion(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    cal = weak["calib"]
    found = _calibrated(cal, RoutingTarget("gap", 0.8))
    name, spec = routing_spec(found, policy=RoutingPolicy.ENTROPY)
    assert (name, spec.policy, spec.second_opinion) == ("entropy", RoutingPolicy.ENTROPY, None)
    assert spec.threshold == found.threshold("entropy")


def test_what_it_cannot_learn_from_gives_no_second_opinion() -> None:
    """Fewer rows of a class than folds, labels the edge has no class for, an input too wide
    to ship the weights of; and no inputs at all: the plain policies only."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=60)
    x = rng.normal(size=(60, 4))
    labels = np.repeat([0, 1, 2], 20)
    assert train_second_opinion(probs, labels, x) is not None
    rare = labels.copy()
    rare[:17] = 1  # class 0 keeps 3 rows
    assert train_second_opinion(probs, rare, x) is None
    assert train_second_opinion(probs, np.where(labels == 2, 5, labels), x) is None
    assert train_second_opinion(probs, labels, rng.normal(size=(60, 30_000))) is None
    found = calibrate(probs, labels, target=RoutingTarget("budget", 0.1))
    assert SECOND_OPINION not in found.report["policies"]
    assert found.second is None


def test_a_second_opinion_asked_for_beside_a_policy_ships_on_that_policy_s_scale(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    """What a federated update asks for a model that routed with a second opinion beside
    entropy: the second opinion again, beside entropy (not the calibration's fallback), its
    threshold moved onto entropy's curve; without a calibrated one, entropy alone."""
    cal = weak["calib"]
    found = _calibrated(cal, RoutingTarget("budget", 0.2))
    name, spec = routing_spec(found, policy=RoutingPolicy.ENTROPY, second_opinion_beside=True)
    assert (name, spec.policy) == (SECOND_OPINION, RoutingPolicy.ENTROPY)
    assert spec.second_opinion is not None
    assert spec.curve == found.curves["entropy"]
    knots = [p.threshold for p in found.curves[SECOND_OPINION]]
    raw = np.array([found.threshold(SECOND_OPINION)])
    assert spec.threshold == pytest.approx(float(on_curve(raw, knots, spec.curve)[0]))
    plain = calibrate(cal["edge"], cal["y"], target=RoutingTarget("budget", 0.2))
    name, spec = routing_spec(plain, policy=RoutingPolicy.ENTROPY, second_opinion_beside=True)
    assert (name, spec.second_opinion) == ("entropy", None)


def test_an_agent_that_does_not_know_the_second_opinion_routes_the_shipped_spec_at_its_share(
    weak: dict[str, dict[str, np.ndarray]],
) -> None:
    """The spec the pipeline ships for a budget of 0.2 chooses the second opinion; an agent
    from before it reads the spec without the field (decode drops it, as unknown) and routes
    by the plain policy on the shipped threshold: about the same share of new rows goes to
    the cloud, and the rows it sends are its least confident ones."""
    cal, new = weak["calib"], weak["test"]
    found = _calibrated(cal, RoutingTarget("budget", 0.2))
    name, spec = routing_spec(found)
    assert name == SECOND_OPINION
    raw = json.loads(spec.model_dump_json())
    raw.pop("second_opinion")
    old = decode(RoutingSpec, json.dumps(raw))
    assert old.threshold is not None
    for rows in (cal, new):
        plain = confidence(rows["edge"], old.policy)
        assert float((plain < old.threshold).mean()) == pytest.approx(0.2, abs=0.03)
