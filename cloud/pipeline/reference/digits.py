"""Digits reference models (scikit-learn's `load_digits`): edge MLP, weak edge, cloud SVM."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.pipeline.reference import graphs

__all__ = [
    "DigitsSplits",
    "build_cloud",
    "build_edge",
    "build_weak_edge",
    "digits_splits",
    "shifted",
]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class DigitsSplits:
    """Seeded stratified train / calibration / test split (60 / 20 / 20) of raw pixels."""

    x_train: Array
    y_train: Array
    x_calib: Array
    y_calib: Array
    x_test: Array
    y_test: Array


def digits_splits(seed: int = 0) -> DigitsSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    y = y.astype(np.int64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, test_size=0.4, stratify=y, random_state=seed
    )
    x_calib, x_test, y_calib, y_test = train_test_split(
        x_rest, y_rest, test_size=0.5, stratify=y_rest, random_state=seed
    )
    return DigitsSplits(x_train, y_train, x_calib, y_calib, x_test, y_test)


def shifted(x: Array, y: Array) -> tuple[Array, Array]:
    """The images and their four one-pixel shifts (zero fill): 5x the data."""
    images = x.reshape(-1, 8, 8)
    out, labels = [images], [y]
    for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
        moved = np.roll(images, (dy, dx), axis=(1, 2))
        if dx == 1:
            moved[:, :, 0] = 0
        if dx == -1:
            moved[:, :, -1] = 0
        if dy == 1:
            moved[:, 0, :] = 0
        if dy == -1:
            moved[:, -1, :] = 0
        out.append(moved)
        labels.append(y)
    return np.concatenate(out).reshape(-1, 64), np.concatenate(labels)


def _mlp(x: Array, y: Array, hidden: tuple[int, ...], seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return MLPClassifier(hidden, max_iter=500, alpha=1e-3, random_state=seed).fit(x, y)


def _mlp_graph(clf: Any, name: str, pool: int | None = None) -> bytes:
    layers = list(zip(clf.coefs_, clf.intercepts_, strict=True))
    return graphs.mlp_classifier(hidden=layers[:-1], head=layers[-1], pool=pool, name=name)


def build_edge(splits: DigitsSplits, seed: int = 0) -> bytes:
    """A small MLP (64 -> 64 -> 32 embedding -> 10), ~98 %."""
    clf = _mlp(splits.x_train / 16.0, splits.y_train, (64, 32), seed)
    return _mlp_graph(clf, "digits_edge")


def build_weak_edge(splits: DigitsSplits, seed: int = 0) -> bytes:
    """The same interface on a 4x4 pooled view of the input, ~91 %: a wide routing gap."""
    pooled = (splits.x_train / 16.0).reshape(-1, 4, 2, 4, 2).mean(axis=(2, 4)).reshape(-1, 16)
    clf = _mlp(pooled, splits.y_train, (32, 16), seed)
    return _mlp_graph(clf, "digits_edge_weak", pool=2)


def build_cloud(splits: DigitsSplits, gamma: float = 0.08, c: float = 10.0) -> bytes:
    """One-vs-rest RBF SVM on shift-augmented data, ~99.3 %."""
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.svm import SVC

    x, y = shifted(splits.x_train / 16.0, splits.y_train)
    model = OneVsRestClassifier(SVC(kernel="rbf", gamma=gamma, C=c)).fit(x, y)
    support_idx = np.unique(np.concatenate([e.support_ for e in model.estimators_]))
    position = {int(i): n for n, i in enumerate(support_idx)}
    coef = np.zeros((len(support_idx), len(model.estimators_)), dtype=np.float32)
    intercepts = np.zeros(len(model.estimators_), dtype=np.float32)
    for k, est in enumerate(model.estimators_):
        coef[[position[int(i)] for i in est.support_], k] = est.dual_coef_[0]
        intercepts[k] = est.intercept_[0]
    return graphs.rbf_svm_classifier(
        support=x[support_idx],
        coefficients=coef,
        intercepts=intercepts,
        gamma=gamma,
        temperature=4.0,
        name="digits_cloud",
    )
