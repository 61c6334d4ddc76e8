"""The second-opinion router's arithmetic as a device runs it: the classifier of the raw
input, the agreement score, the move onto the fallback policy's scale, and the spec rules
that keep an agent that does not know it routing."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from pydantic import ValidationError

from shared.errors import InvalidInput
from shared.messages import CurvePoint, RoutingPolicy, RoutingSpec, SecondOpinion, decode
from shared.routing import confidence, spec_confidence
from shared.second_opinion import (
    agreement,
    on_curve,
    second_opinion_confidence,
    second_opinion_log_probabilities,
)

EDGE = np.array([[0.8, 0.1, 0.1], [0.7, 0.0, 0.3]])
# Reads the same three values the edge gives; strongly prefers class 2 when x[2] is high.
OPINION = SecondOpinion(
    weights=[20.0, 0.0, 0.0, 0.0, 20.0, 0.0, 0.0, 0.0, 60.0],
    bias=[0.0, 0.0, 0.0],
    alpha=0.5,
    knots=[0.0, 0.5, 1.0],
)
CURVE = [
    CurvePoint(offload=0.0, threshold=0.3),
    CurvePoint(offload=0.5, threshold=0.6),
    CurvePoint(offload=1.0, threshold=1.0),
]


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_the_classifier_is_a_softmax_of_the_flattened_input() -> None:
    """[2, 3] rows, also given as [2, 1, 3]: log softmax(x @ W + b) with W row-major [D, K]."""
    got = second_opinion_log_probabilities(OPINION, EDGE)
    weights = np.array(OPINION.weights).reshape(3, 3)
    np.testing.assert_allclose(got, _log_softmax(EDGE @ weights))
    np.testing.assert_allclose(np.exp(got).sum(axis=1), 1.0)
    np.testing.assert_allclose(second_opinion_log_probabilities(OPINION, EDGE[:, None, :]), got)
    assert got[0].argmax() == 0
    assert got[1].argmax() == 2


def test_the_agreement_is_the_weighted_geometric_mean_for_the_edge_answer() -> None:
    second = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    got = agreement(EDGE, second, 0.5)
    assert got[0] == pytest.approx(math.sqrt(0.8 * 0.5))
    assert got[1] == pytest.approx(math.sqrt(0.7 * 0.1))
    np.testing.assert_allclose(agreement(EDGE, second, 0.0), [0.8, 0.7])  # the edge's max_prob
    np.testing.assert_allclose(agreement(EDGE, second, 1.0), [0.5, 0.1])
    zero = agreement(np.array([[1.0, 0.0]]), np.array([[-np.inf, 0.0]]), 0.5)
    assert np.isfinite(zero).all()
    assert 0 < zero[0] < 1e-5


def test_the_knots_move_a_confidence_onto_the_curve_keeping_the_order() -> None:
    """Knot i lands on the curve's threshold i, linearly in between; the order of the rows
    is kept, and a threshold moved the same way offloads the same rows."""
    np.testing.assert_allclose(
        on_curve(np.array([0.0, 0.5, 1.0]), OPINION.knots, CURVE), [0.3, 0.6, 1.0]
    )
    assert on_curve(np.array([0.25]), OPINION.knots, CURVE)[0] == pytest.approx(0.45)
    raw = np.random.default_rng(0).random(500)
    knots = np.quantile(raw, np.linspace(0, 1, 21)).tolist()
    curve = [CurvePoint(offload=i / 20, threshold=0.2 + 0.04 * i) for i in range(21)]
    moved = on_curve(raw, knots, curve)
    assert (np.argsort(moved, kind="stable") == np.argsort(raw, kind="stable")).all()
    for t in (0.1, 0.37, 0.9):
        assert ((raw < t) == (moved < on_curve(np.array([t]), knots, curve)[0])).all()
    with pytest.raises(InvalidInput, match="2 knots for a curve of 3"):
        on_curve(raw, [0.0, 1.0], CURVE)


def test_a_spec_with_a_second_opinion_ranks_by_it_only_when_it_has_the_inputs() -> None:
    """The first row both models agree on; the second the edge calls class 0 at 0.7, the
    second opinion class 2: by max_prob both are easy at 0.6, with the second opinion the
    second row is hard."""
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=CURVE, second_opinion=OPINION
    )
    outputs = {"probabilities": EDGE}
    with_inputs = spec_confidence(spec, outputs, {"input": EDGE})
    np.testing.assert_allclose(with_inputs, second_opinion_confidence(OPINION, EDGE, EDGE, CURVE))
    assert list(with_inputs < 0.6) == [False, True]
    without = spec_confidence(spec, outputs)
    np.testing.assert_allclose(without, confidence(EDGE, RoutingPolicy.MAX_PROB))
    assert list(without < 0.6) == [False, False]
    with pytest.raises(InvalidInput, match="needs input 'input'"):
        spec_confidence(spec, outputs, {"pixels": EDGE})
    with pytest.raises(InvalidInput, match="reads 3 values a row"):
        spec_confidence(spec, outputs, {"input": EDGE[:, :2]})


def test_an_agent_that_does_not_know_the_field_reads_the_plain_policy() -> None:
    """A reader of the fields as they were (the second opinion dropped by decode, as unknown
    fields are) gets the same policy, threshold and curve: it routes, by max_prob."""
    spec = RoutingSpec(
        policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=CURVE, second_opinion=OPINION
    )
    raw = json.loads(spec.model_dump_json())
    raw["a_field_from_the_future"] = {"x": 1}
    again = decode(RoutingSpec, json.dumps(raw))
    assert again == spec
    raw.pop("second_opinion")
    old = decode(RoutingSpec, json.dumps(raw))
    assert (old.policy, old.threshold, old.curve) == (spec.policy, spec.threshold, spec.curve)
    assert old.second_opinion is None


def test_inconsistent_second_opinions_are_refused() -> None:
    with pytest.raises(ValidationError, match="one knot per point"):
        RoutingSpec(
            policy=RoutingPolicy.MAX_PROB, threshold=0.6, curve=CURVE[:2], second_opinion=OPINION
        )
    with pytest.raises(ValidationError, match="scored policy"):
        RoutingSpec(policy=RoutingPolicy.ALWAYS_EDGE, curve=CURVE, second_opinion=OPINION)
    with pytest.raises(ValidationError, match="one row of len"):
        SecondOpinion(weights=[1.0] * 7, bias=[0.0] * 3, alpha=0.5, knots=[0.0, 1.0])
    with pytest.raises(ValidationError, match="must not decrease"):
        SecondOpinion(weights=[1.0] * 6, bias=[0.0] * 3, alpha=0.5, knots=[0.5, 0.1])
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        SecondOpinion(weights=[1.0] * 6, bias=[0.0] * 3, alpha=1.5, knots=[0.0, 1.0])
