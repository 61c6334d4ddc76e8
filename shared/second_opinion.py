"""The second-opinion router's arithmetic, numpy only: the device runs exactly this, the
pipeline calibrates with it.

A weak edge model's own outputs say little about its mistakes (B2: no router on its scores
or embedding passes an APGR of ~0.88). A small linear classifier of the raw input, trained
on the class labels rather than on the few dozen rows the edge gets wrong, disagrees with
the edge on most of them: the product of the two probabilities for the edge's answer is the
confidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput
from shared.messages import CurvePoint, SecondOpinion

__all__ = [
    "agreement",
    "on_curve",
    "second_opinion_confidence",
    "second_opinion_log_probabilities",
]

Floats = npt.NDArray[np.floating[Any]]
# A probability of exactly 0 would make the log -inf and tie every such row.
_FLOOR = 1e-12


def second_opinion_log_probabilities(opinion: SecondOpinion, x: Floats) -> Floats:
    """log softmax(x @ W + b) for the flattened input rows ``x``: [N, K]."""
    classes = len(opinion.bias)
    features = len(opinion.weights) // classes
    rows = np.asarray(x, dtype=np.float64)
    if rows.ndim >= 2:
        rows = rows.reshape(len(rows), -1)
    if rows.ndim != 2 or rows.shape[1] != features:
        raise InvalidInput(
            f"the second opinion reads {features} values a row of {opinion.input!r}, "
            f"got {list(np.shape(x))}"
        )
    weights = np.asarray(opinion.weights, dtype=np.float64).reshape(features, classes)
    logits = rows @ weights + np.asarray(opinion.bias, dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    log_probs: Floats = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return log_probs


def agreement(edge_probabilities: Floats, second_log_probabilities: Floats, alpha: float) -> Floats:
    """p_edge(answer)^(1 - alpha) * p_second(answer)^alpha, per row, where the answer is the
    edge's (its arg max)."""
    p = np.asarray(edge_probabilities, dtype=np.float64)
    if p.ndim != 2 or second_log_probabilities.shape != p.shape:
        raise InvalidInput(
            f"the second opinion gives {list(second_log_probabilities.shape)} for the edge's "
            f"{list(p.shape)} probabilities: it was trained for another model"
        )
    rows = np.arange(len(p))
    answer = p.argmax(axis=1)
    edge_log = np.log(np.clip(p[rows, answer], _FLOOR, 1.0))
    second_log = np.maximum(second_log_probabilities[rows, answer], np.log(_FLOOR))
    confidence: Floats = np.exp((1.0 - alpha) * edge_log + alpha * second_log)
    return confidence


def on_curve(raw: Floats, knots: Sequence[float], curve: Sequence[CurvePoint]) -> Floats:
    """``raw`` moved onto the curve's threshold scale: piecewise linear through (knot,
    threshold) pairs, which are the same offload share on both scales, so the order of the
    rows is kept wherever the curve's thresholds rise, and a threshold mapped the same way
    offloads the same rows."""
    if len(knots) != len(curve):
        raise InvalidInput(f"{len(knots)} knots for a curve of {len(curve)} points")
    mapped: Floats = np.interp(raw, np.asarray(knots), np.array([p.threshold for p in curve]))
    return mapped


def second_opinion_confidence(
    opinion: SecondOpinion, probabilities: Floats, x: Floats, curve: Sequence[CurvePoint]
) -> Floats:
    """The confidence a device compares with the routing spec's threshold."""
    raw = agreement(probabilities, second_opinion_log_probabilities(opinion, x), opinion.alpha)
    return on_curve(raw, opinion.knots, curve)
