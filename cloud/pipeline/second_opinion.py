"""Training the second-opinion router: a linear softmax classifier of the edge model's raw
input, fitted to the class labels of the calibration split, and how much it counts against
the edge's own probability (see :mod:`shared.second_opinion`).

Why class labels: a router fitted to "the edge is wrong" learns from the few dozen rows where
that happens (too few: on the weak digits edge, no such router on the scores, the embedding
or the raw input passes an APGR of ~0.88); a classifier of the input learns from every row.
Its regularisation and its weight are chosen by cross-validation on the calibration split
(out-of-fold probabilities, never scored on the rows they were fitted to), and thresholds
are set on those out-of-fold confidences: in-sample, a classifier with as many weights as
this one agrees with the labels far more often than it will on new rows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.learned_router import gain_area
from shared.messages import MAX_SECOND_OPINION_WEIGHTS, SecondOpinion
from shared.second_opinion import agreement, second_opinion_log_probabilities

__all__ = ["ALPHA_GRID", "C_GRID", "TrainedSecondOpinion", "train_second_opinion"]

Array = npt.NDArray[Any]
C_GRID = (0.1, 0.3, 1.0, 3.0)
# 0 would be the edge's own max_prob: the calibration compares against that anyway.
ALPHA_GRID = (0.25, 0.5, 0.75, 1.0)
FOLDS = 5


@dataclass(frozen=True, slots=True)
class TrainedSecondOpinion:
    """The fitted classifier (``knots`` still empty: they come from the calibration curve)
    and the out-of-fold confidences on the calibration rows, what thresholds are set on."""

    weights: list[float]
    bias: list[float]
    alpha: float
    c: float
    input_name: str
    calibration_confidence: Array
    out_of_fold_area: float
    # Accuracy of the second opinion alone, out of fold: how much it knows on its own.
    out_of_fold_accuracy: float

    def opinion(self, knots: list[float]) -> SecondOpinion:
        return SecondOpinion(
            input=self.input_name,
            weights=self.weights,
            bias=self.bias,
            alpha=self.alpha,
            knots=knots,
        )


def _fit(z: Array, labels: Array, c: float) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=3000).fit(z, labels)


def _folded(model: Any, mean: Array, scale: Array) -> tuple[Array, Array]:
    """Weights [D, K] and bias [K] on the raw input: the standardisation folded in."""
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:
        # Two classes: scikit-learn keeps one logit, softmax([0, z]) is the same model.
        coef = np.vstack([np.zeros_like(coef[0]), coef[0]])
        intercept = np.array([0.0, intercept[0]])
    weights = coef.T / scale[:, None]
    bias = intercept - mean @ weights
    return weights, bias


def _as_opinion(weights: Array, bias: Array, alpha: float) -> SecondOpinion:
    return SecondOpinion(
        weights=weights.ravel().tolist(), bias=bias.tolist(), alpha=alpha, knots=[0.0, 1.0]
    )


def _standardise(x: Array) -> tuple[Array, Array, Array]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    return (x - mean) / scale, mean, scale


def _cross_fitted(
    x: Array, labels: Array, c: float, classes: int, seed: int
) -> tuple[Array, Array, Array]:
    """Each row's log probabilities from a fold model that never saw it, and the mean of the
    fold models' weights and bias: the model that ships. Averaged logits are one linear model
    whose confidence on new rows is on the scale of the fold models' on their held-out rows
    (a model refitted on every row would be surer, and offload less than calibrated)."""
    from sklearn.model_selection import StratifiedKFold

    out = np.zeros((len(labels), classes))
    weights = np.zeros((x.shape[1], classes))
    bias = np.zeros(classes)
    splitter = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=seed)
    for train, held in splitter.split(x, labels):
        z, mean, scale = _standardise(x[train])
        w, b = _folded(_fit(z, labels[train], c), mean, scale)
        out[held] = second_opinion_log_probabilities(_as_opinion(w, b, 1.0), x[held])
        weights += w / FOLDS
        bias += b / FOLDS
    return out, weights, bias


def train_second_opinion(
    edge_probs: Array,
    labels: Array,
    inputs: Array,
    *,
    cloud_probs: Array | None = None,
    input_name: str = "input",
    seed: int = 0,
) -> TrainedSecondOpinion | None:
    """Fit the second opinion; None when it does not apply: an input too wide to ship the
    weights of, labels outside the edge's classes, or a class with fewer rows than folds."""
    x = np.asarray(inputs, dtype=np.float64)
    if x.ndim < 2 or len(x) != len(labels):
        return None
    x = x.reshape(len(x), -1)
    classes = edge_probs.shape[1]
    if x.shape[1] * classes > MAX_SECOND_OPINION_WEIGHTS:
        return None
    if labels.min() < 0 or labels.max() >= classes:
        return None
    # Every fold must see every class, or its classifier has fewer outputs than the edge.
    if np.bincount(labels, minlength=classes).min() < FOLDS:
        return None
    edge_ok = edge_probs.argmax(axis=1) == labels
    cloud_ok = (
        cloud_probs.argmax(axis=1) == labels if cloud_probs is not None else np.ones_like(edge_ok)
    )
    best: tuple[float, float, float, Array, float, Array, Array] | None = None
    for c in C_GRID:
        held_out, weights, bias = _cross_fitted(x, labels, c, classes, seed)
        accuracy = float((held_out.argmax(axis=1) == labels).mean())
        for alpha in ALPHA_GRID:
            confidence = agreement(edge_probs, held_out, alpha)
            area = gain_area(confidence, edge_ok, cloud_ok)
            if best is None or area > best[0] + 1e-12:
                best = (area, c, alpha, confidence, accuracy, weights, bias)
    assert best is not None
    area, c, alpha, confidence, accuracy, weights, bias = best
    return TrainedSecondOpinion(
        weights=weights.ravel().astype(float).tolist(),
        bias=bias.astype(float).tolist(),
        alpha=alpha,
        c=c,
        input_name=input_name,
        calibration_confidence=confidence,
        out_of_fold_area=area,
        out_of_fold_accuracy=accuracy,
    )
