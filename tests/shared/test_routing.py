"""Routing scores the device and the pipeline share: each policy's confidence on known
inputs, the learned router in numpy, the routing spec's evolution rules, and the budget
helper that moves a device along its calibration curve."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from shared.errors import InvalidInput
from shared.messages import (
    CurvePoint,
    LearnedRouter,
    Manifest,
    RoutingPolicy,
    RoutingSpec,
    decode,
)
from shared.routing import (
    confidence,
    learned_confidence,
    router_features,
    spec_confidence,
    threshold_for_budget,
)

ROWS = np.array([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1.0, 0.0, 0.0]])


def test_each_score_policy_gives_its_confidence_on_known_rows() -> None:
    np.testing.assert_allclose(confidence(ROWS, RoutingPolicy.MAX_PROB), [0.7, 0.4, 1.0])
    np.testing.assert_allclose(confidence(ROWS, RoutingPolicy.MARGIN), [0.5, 0.0, 1.0])
    entropy = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(3)
    certainty = confidence(ROWS, RoutingPolicy.ENTROPY)
    assert certainty[0] == pytest.approx(1 - entropy)
    assert certainty[2] == pytest.approx(1.0)  # a zero probability is no error here
    np.testing.assert_array_equal(confidence(ROWS, RoutingPolicy.ALWAYS_EDGE), [1, 1, 1])
    np.testing.assert_array_equal(confidence(ROWS, RoutingPolicy.ALWAYS_CLOUD), [0, 0, 0])


def test_router_features_are_sorted_scores_margin_entropy_then_the_embedding() -> None:
    features = router_features(ROWS[:1], np.array([[5.0, 6.0]]))
    np.testing.assert_allclose(features[0, :4], [0.7, 0.2, 0.1, 0.5])
    assert features[0, 4] == pytest.approx(1 - confidence(ROWS[:1], RoutingPolicy.ENTROPY)[0])
    np.testing.assert_allclose(features[0, 5:], [5.0, 6.0])


def _router(weights: list[float], bias: float, embedding: str | None = None) -> LearnedRouter:
    n = len(weights)
    return LearnedRouter(
        embedding_output=embedding, mean=[0.0] * n, scale=[1.0] * n, weights=weights, bias=bias
    )


def test_the_learned_confidence_is_one_minus_the_logistic_of_the_features() -> None:
    """A weight on the margin only: confidence = 1 - sigmoid(-4 * margin + 1)."""
    router = _router([0, 0, 0, -4.0, 0], 1.0)
    got = learned_confidence(router, ROWS)
    expected = [1 - 1 / (1 + math.exp(-(-4 * m + 1))) for m in (0.5, 0.0, 1.0)]
    np.testing.assert_allclose(got, expected)
    extreme = learned_confidence(_router([0, 0, 0, 1e6, 0], 0.0), ROWS)
    assert np.isfinite(extreme).all()  # no overflow warning (warnings are errors)


def test_a_learned_router_for_another_model_is_refused_clearly() -> None:
    with pytest.raises(InvalidInput, match="trained for another model"):
        learned_confidence(_router([1.0, 2.0], 0.0), ROWS)
    with pytest.raises(InvalidInput, match="needs output 'embedding'"):
        learned_confidence(_router([0.0] * 6, 0.0, embedding="embedding"), ROWS)


def test_spec_confidence_reads_the_named_outputs() -> None:
    spec = RoutingSpec(
        policy=RoutingPolicy.LEARNED,
        learned=_router([0.0] * 5 + [2.0], 0.0, embedding="features"),
        probabilities_output="scores",
    )
    outputs = {"scores": ROWS, "features": np.array([[0.0], [1.0], [-1.0]])}
    np.testing.assert_allclose(
        spec_confidence(spec, outputs), 1 - 1 / (1 + np.exp(-2.0 * np.array([0, 1, -1])))
    )
    with pytest.raises(InvalidInput, match="no output 'probabilities'"):
        spec_confidence(RoutingSpec(policy=RoutingPolicy.MAX_PROB), {"scores": ROWS})


def test_an_old_routing_spec_reads_with_defaults_that_keep_the_old_behaviour() -> None:
    """A manifest from before the cloud model, the named output, the curve and the learned
    router existed still reads; the new fields say what the old agent did."""
    raw = {
        "model": "digits-edge",
        "version": 2,
        "precision": "int8",
        "artifact": {"sha256": "0" * 64, "size": 2048, "chunk_size": 2048, "chunks": ["0" * 64]},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
        "routing": {"policy": "max_prob", "threshold": 0.8},
    }
    routing = decode(Manifest, json.dumps(raw)).routing
    assert routing is not None
    assert routing.cloud_model is None  # the agent asks for the edge model's own name
    assert routing.probabilities_output == "probabilities"
    assert (routing.curve, routing.learned) == ([], None)


def test_a_learned_policy_without_its_model_or_a_disordered_curve_is_refused() -> None:
    with pytest.raises(ValidationError, match="needs its model"):
        RoutingSpec(policy=RoutingPolicy.LEARNED, threshold=0.5)
    with pytest.raises(ValidationError, match="increasing offload"):
        RoutingSpec(
            policy=RoutingPolicy.MAX_PROB,
            curve=[CurvePoint(offload=0.5, threshold=0.9), CurvePoint(offload=0.1, threshold=0.6)],
        )
    with pytest.raises(ValidationError, match="one entry per feature"):
        LearnedRouter(mean=[0.0], scale=[1.0, 1.0], weights=[1.0], bias=0.0)


CURVE = [
    CurvePoint(offload=0.0, threshold=0.30),
    CurvePoint(offload=0.1, threshold=0.60),
    CurvePoint(offload=0.2, threshold=0.80),
    CurvePoint(offload=1.0, threshold=1.00),
]


def test_threshold_for_budget_moves_along_the_curve() -> None:
    assert threshold_for_budget(CURVE, 0.1) == pytest.approx(0.60)
    assert threshold_for_budget(CURVE, 0.15) == pytest.approx(0.70)  # between two points
    assert threshold_for_budget(CURVE, 0.0) == pytest.approx(0.30)
    assert threshold_for_budget(CURVE, 1.0) == pytest.approx(1.00)
    assert threshold_for_budget(CURVE[:3], 0.5) == pytest.approx(0.80)  # beyond the last


def test_threshold_for_budget_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(InvalidInput, match="no calibration curve"):
        threshold_for_budget([], 0.1)
    with pytest.raises(InvalidInput, match=r"share in \[0, 1\]"):
        threshold_for_budget(CURVE, 1.5)
