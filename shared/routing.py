"""Hard-example scores shared by the edge router and the cloud's threshold calibration.

Each policy turns the edge model's outputs into a per-row *confidence* in [0, 1]; a row is
hard, and goes to the cloud, when its confidence is below the policy's threshold. Numpy
only: the device runs exactly this code, the pipeline calibrates with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput
from shared.messages import CurvePoint, LearnedRouter, RoutingPolicy, RoutingSpec
from shared.second_opinion import second_opinion_confidence

__all__ = [
    "confidence",
    "is_hard",
    "learned_confidence",
    "router_features",
    "spec_confidence",
    "threshold_for_budget",
]

Floats = npt.NDArray[np.floating[Any]]
_SCORE_POLICIES = (RoutingPolicy.MAX_PROB, RoutingPolicy.MARGIN, RoutingPolicy.ENTROPY)


def _probabilities(probabilities: Floats) -> Floats:
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise InvalidInput(f"probabilities must be [N, K>=2], got {list(p.shape)}")
    return p


def _normalised_entropy(p: Floats) -> Floats:
    # Sedna's CrossEntropyFilter form: 0 = certain, 1 = uniform. Clipped, where Sedna's
    # math.log raises on a probability of exactly 0.
    q = np.clip(p, 1e-12, 1.0)
    entropy: Floats = -(q * np.log(q)).sum(axis=1) / np.log(p.shape[1])
    return entropy


def confidence(probabilities: Floats, policy: RoutingPolicy) -> Floats:
    """Per-row confidence of ``probabilities`` ([N, K]) under a score policy."""
    p = _probabilities(probabilities)
    if policy is RoutingPolicy.MAX_PROB:
        best: Floats = p.max(axis=1)
        return best
    if policy is RoutingPolicy.MARGIN:
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        margin: Floats = top2[:, 1] - top2[:, 0]
        return margin
    if policy is RoutingPolicy.ENTROPY:
        certainty: Floats = 1.0 - _normalised_entropy(p)
        return certainty
    if policy is RoutingPolicy.ALWAYS_EDGE:
        return np.ones(p.shape[0])
    if policy is RoutingPolicy.ALWAYS_CLOUD:
        return np.zeros(p.shape[0])
    raise InvalidInput(f"policy {policy.value} needs more than probabilities")


def router_features(probabilities: Floats, embedding: Floats | None = None) -> Floats:
    """The learned router's inputs: sorted probabilities (high to low), margin, normalised
    entropy, then the embedding if one is given. [N, K + 2 (+ D)], float64."""
    p = _probabilities(probabilities)
    ranked = -np.sort(-p, axis=1)
    columns = [ranked, (ranked[:, 0] - ranked[:, 1])[:, None], _normalised_entropy(p)[:, None]]
    if embedding is not None:
        e = np.asarray(embedding, dtype=np.float64)
        if e.ndim != 2 or e.shape[0] != p.shape[0]:
            raise InvalidInput(
                f"embedding must be [N={p.shape[0]}, D], got {list(e.shape)} for the router"
            )
        columns.append(e)
    features: Floats = np.hstack(columns)
    return features


def learned_confidence(
    router: LearnedRouter, probabilities: Floats, embedding: Floats | None = None
) -> Floats:
    """1 - P(edge wrong and cloud right) under ``router``, per row."""
    if router.embedding_output is not None and embedding is None:
        raise InvalidInput(f"the learned router needs output {router.embedding_output!r}")
    features = router_features(
        probabilities, embedding if router.embedding_output is not None else None
    )
    if features.shape[1] != len(router.weights):
        raise InvalidInput(
            f"the learned router has {len(router.weights)} weights for "
            f"{features.shape[1]} features: it was trained for another model"
        )
    z = (features - np.asarray(router.mean)) / np.asarray(router.scale)
    logit = z @ np.asarray(router.weights) + router.bias
    # 1 - sigmoid(x) == sigmoid(-x), written so that neither side overflows.
    certainty: Floats = np.exp(-np.logaddexp(0.0, logit))
    return certainty


def spec_confidence(
    spec: RoutingSpec,
    outputs: Mapping[str, Floats],
    inputs: Mapping[str, Floats] | None = None,
) -> Floats:
    """Per-row confidence under ``spec``, read from the edge model's named outputs (and,
    for a second opinion, its inputs; without them the spec's policy ranks the rows)."""
    name = spec.probabilities_output
    if name not in outputs:
        raise InvalidInput(f"the edge model gives no output {name!r} to route on")
    probabilities = outputs[name]
    opinion = spec.second_opinion
    if opinion is not None and inputs is not None:
        if opinion.input not in inputs:
            raise InvalidInput(f"the second opinion needs input {opinion.input!r}")
        return second_opinion_confidence(opinion, probabilities, inputs[opinion.input], spec.curve)
    if spec.policy is RoutingPolicy.LEARNED:
        assert spec.learned is not None  # RoutingSpec refuses the policy without it
        wanted = spec.learned.embedding_output
        if wanted is not None and wanted not in outputs:
            raise InvalidInput(f"the learned router needs output {wanted!r}")
        return learned_confidence(
            spec.learned, probabilities, outputs[wanted] if wanted is not None else None
        )
    return confidence(probabilities, spec.policy)


def is_hard(
    probabilities: Floats, policy: RoutingPolicy, threshold: float | None
) -> npt.NDArray[np.bool_]:
    if policy is RoutingPolicy.ALWAYS_EDGE:
        return np.zeros(len(probabilities), dtype=bool)
    if policy is RoutingPolicy.ALWAYS_CLOUD:
        return np.ones(len(probabilities), dtype=bool)
    if threshold is None:
        raise InvalidInput(f"policy {policy.value} needs a threshold")
    hard: npt.NDArray[np.bool_] = confidence(probabilities, policy) < threshold
    return hard


def threshold_for_budget(curve: Sequence[CurvePoint], max_offload: float) -> float:
    """The threshold that offloads about ``max_offload`` of the inputs (at most, at the
    curve's points; linear between them), from a calibration curve.

    A budget of 0 gives the curve's lowest threshold (nothing below it on the calibration
    split); a budget above the curve's last point gives its last threshold."""
    if not curve:
        raise InvalidInput("no calibration curve to follow a budget with")
    if not 0.0 <= max_offload <= 1.0:
        raise InvalidInput(f"an offload budget is a share in [0, 1], got {max_offload}")
    offloads = np.array([p.offload for p in curve])
    thresholds = np.array([p.threshold for p in curve])
    return float(np.interp(max_offload, offloads, thresholds))
