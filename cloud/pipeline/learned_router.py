"""The learned router: a logistic regression, fitted on the calibration split, of "the edge
is wrong and the cloud right" from the edge's scores (and embedding).

scikit-learn fits it here in the cloud; the device runs the shipped weights in numpy
(:func:`shared.routing.learned_confidence`). The regularisation strength and whether the
embedding is used are chosen by cross-validation on the calibration split (out-of-fold
scores: a configuration is never judged on the rows it was fitted to). The embedding must
earn its place: with a few dozen rows where offloading helps, a model on 16-32 more features
mostly learns noise, so it is taken only when it beats the scores alone by a clear margin.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.messages import LearnedRouter
from shared.routing import learned_confidence, router_features

__all__ = ["C_GRID", "TrainedRouter", "gain_area", "train_learned_router"]

Array = npt.NDArray[Any]
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1)
MIN_POSITIVES = 3
# The share of the calibration split's edge→cloud gap the embedding must add to be used.
EMBEDDING_MARGIN = 0.05


@dataclass(frozen=True, slots=True)
class TrainedRouter:
    router: LearnedRouter
    # The shipped model's confidence on the calibration rows: what thresholds are set on
    # (the out-of-fold models score on another scale than the model that ships).
    calibration_confidence: Array
    # The cross-validated gain area of the chosen configuration (see gain_area).
    out_of_fold_area: float
    c: float
    uses_embedding: bool


def gain_area(confidence: Array, edge_ok: Array, cloud_ok: Array) -> float:
    """Mean joint accuracy over every offload share when the least confident go first (the
    un-normalised APGR): what the cross-validation maximises."""
    order = np.argsort(confidence, kind="stable")
    gains = (cloud_ok[order].astype(np.int64) - edge_ok[order].astype(np.int64)).cumsum()
    return float((edge_ok.sum() + np.concatenate([[0], gains])).mean() / len(order))


def _fit(z: Array, y: Array, c: float) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=2000).fit(z, y)


def _out_of_fold(z: Array, y: Array, c: float, folds: int, seed: int) -> Array:
    from sklearn.model_selection import StratifiedKFold

    gain = np.zeros(len(y))
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held in splitter.split(z, y):
        gain[held] = _fit(z[train], y[train], c).predict_proba(z[held])[:, 1]
    certainty: Array = 1.0 - gain
    return certainty


def train_learned_router(
    edge_probs: Array,
    labels: Array,
    *,
    cloud_probs: Array | None = None,
    embedding: Array | None = None,
    embedding_output: str = "embedding",
    folds: int = 5,
    seed: int = 0,
) -> TrainedRouter | None:
    """Fit the router; None when the split has too few rows to learn from (fewer than
    :data:`MIN_POSITIVES` rows where offloading helps, or no row where it does not)."""
    edge_ok = edge_probs.argmax(axis=1) == labels
    cloud_ok = (
        cloud_probs.argmax(axis=1) == labels if cloud_probs is not None else np.ones_like(edge_ok)
    )
    y = (~edge_ok & cloud_ok).astype(np.int64)
    positives = int(y.sum())
    if positives < MIN_POSITIVES or positives == len(y):
        return None
    folds = min(folds, positives)
    gap = max(float(cloud_ok.mean() - edge_ok.mean()), 1.0 / len(y))
    best: dict[bool, tuple[float, float]] = {}
    for uses_embedding in [False, True] if embedding is not None else [False]:
        z, _mean, _scale = _standardised(edge_probs, embedding if uses_embedding else None)
        for c in C_GRID:
            area = gain_area(_out_of_fold(z, y, c, folds, seed), edge_ok, cloud_ok)
            if uses_embedding not in best or area > best[uses_embedding][0] + 1e-12:
                best[uses_embedding] = (area, c)
    uses_embedding = True in best and best[True][0] > best[False][0] + EMBEDDING_MARGIN * gap
    area, c = best[uses_embedding]
    chosen_embedding = embedding if uses_embedding else None
    z, mean, scale = _standardised(edge_probs, chosen_embedding)
    model = _fit(z, y, c)
    router = LearnedRouter(
        embedding_output=embedding_output if uses_embedding else None,
        mean=mean.tolist(),
        scale=scale.tolist(),
        weights=model.coef_[0].astype(float).tolist(),
        bias=float(model.intercept_[0]),
    )
    certainty = learned_confidence(router, edge_probs, chosen_embedding)
    return TrainedRouter(router, certainty, area, c, uses_embedding)


def _standardised(probs: Array, embedding: Array | None) -> tuple[Array, Array, Array]:
    x = router_features(probs, embedding)
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    return (x - mean) / scale, mean, scale
