"""The classifier head trained on a device, in numpy: logits = embedding @ W + b, softmax
cross-entropy, mini-batch SGD or Adam, and FedProx's proximal term (mu/2)·|w - w_global|².

Pure functions of their inputs and seed: the same buffer and global head give the same
update on any machine with the same numpy, which is what lets a test recompute what a
client sent and check the server's average against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput

__all__ = ["HeadUpdate", "TrainConfig", "evaluate_head", "train_head"]

Array = npt.NDArray[Any]
# How the graph's Gemm reads the weight: [embedding, classes] (transB=0) or its transpose.
Layout = Literal["in_out", "out_in"]


@dataclass(frozen=True, slots=True)
class TrainConfig:
    epochs: int = 10
    learning_rate: float = 0.02
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    # FedProx: pull towards the global head this round started from (0: plain FedAvg).
    proximal_mu: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.epochs <= 1000:
            raise InvalidInput(f"epochs must be 1..1000, got {self.epochs}")
        if not 0 < self.learning_rate <= 10:
            raise InvalidInput(f"learning rate must be in (0, 10], got {self.learning_rate}")
        if not 1 <= self.batch_size <= 65536:
            raise InvalidInput(f"batch size must be 1..65536, got {self.batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise InvalidInput(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if not 0 <= self.proximal_mu <= 1000:
            raise InvalidInput(f"proximal mu must be in [0, 1000], got {self.proximal_mu}")


@dataclass(frozen=True, slots=True)
class HeadUpdate:
    weight: Array  # in the graph's layout
    bias: Array
    examples: int
    loss_before: float
    loss_after: float
    accuracy_before: float
    accuracy_after: float


def _as_in_out(weight: Array, layout: Layout) -> Array:
    return weight if layout == "in_out" else weight.T


def _check(weight: Array, bias: Array, embeddings: Array, labels: Array) -> None:
    if weight.ndim != 2 or bias.ndim != 1 or weight.shape[1] != bias.shape[0]:
        raise InvalidInput(f"head shapes {weight.shape} and {bias.shape} do not fit together")
    if embeddings.ndim != 2 or embeddings.shape[1] != weight.shape[0]:
        raise InvalidInput(
            f"embeddings of shape {embeddings.shape} do not fit a head of shape {weight.shape}"
        )
    if len(labels) != len(embeddings):
        raise InvalidInput(f"{len(labels)} labels for {len(embeddings)} embeddings")
    if len(labels) and (labels.min() < 0 or labels.max() >= weight.shape[1]):
        raise InvalidInput(f"labels must be in 0..{weight.shape[1] - 1}")
    if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
        raise InvalidInput("the head has NaN or infinite values")


def _loss_and_accuracy(w: Array, b: Array, x: Array, y: Array) -> tuple[float, float]:
    logits = x @ w + b
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(y)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


def evaluate_head(
    weight: Array, bias: Array, embeddings: Array, labels: Array, *, layout: Layout = "in_out"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the head on ``embeddings``."""
    w = _as_in_out(np.asarray(weight, dtype=np.float64), layout)
    b = np.asarray(bias, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    _check(w, b, embeddings, y)
    return _loss_and_accuracy(w, b, np.asarray(embeddings, dtype=np.float64), y)


def train_head(
    weight: Array,
    bias: Array,
    embeddings: Array,
    labels: Array,
    config: TrainConfig,
    *,
    layout: Layout = "in_out",
) -> HeadUpdate:
    """Train the head from ``weight``/``bias`` (the global head) on the given data."""
    # float64 for the arithmetic: the update is small next to the weights, and float32
    # rounding would make it depend on summation order more than it needs to.
    w0 = _as_in_out(np.asarray(weight, dtype=np.float64), layout)
    b0 = np.asarray(bias, dtype=np.float64)
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    _check(w0, b0, x, y)
    if len(y) == 0:
        raise InvalidInput("no examples to train on")
    if not np.isfinite(x).all():
        raise InvalidInput("the embeddings have NaN or infinite values")
    loss_before, accuracy_before = _loss_and_accuracy(w0, b0, x, y)
    w, b = w0.copy(), b0.copy()
    moments = [np.zeros_like(w), np.zeros_like(w), np.zeros_like(b), np.zeros_like(b)]
    rng = np.random.default_rng(config.seed)
    step = 0
    for _ in range(config.epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), config.batch_size):
            batch = order[start : start + config.batch_size]
            logits = x[batch] @ w + b
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            probs[np.arange(len(batch)), y[batch]] -= 1.0
            probs /= len(batch)
            grad_w = x[batch].T @ probs + config.proximal_mu * (w - w0)
            grad_b = probs.sum(axis=0) + config.proximal_mu * (b - b0)
            step += 1
            if config.optimizer == "sgd":
                w -= config.learning_rate * grad_w
                b -= config.learning_rate * grad_b
            else:
                w -= _adam(grad_w, moments[0], moments[1], step, config.learning_rate)
                b -= _adam(grad_b, moments[2], moments[3], step, config.learning_rate)
    loss_after, accuracy_after = _loss_and_accuracy(w, b, x, y)
    dtype = np.asarray(weight).dtype
    out_w = (w if layout == "in_out" else w.T).astype(dtype)
    return HeadUpdate(
        weight=out_w,
        bias=b.astype(np.asarray(bias).dtype),
        examples=len(y),
        loss_before=loss_before,
        loss_after=loss_after,
        accuracy_before=accuracy_before,
        accuracy_after=accuracy_after,
    )


def _adam(grad: Array, first: Array, second: Array, step: int, lr: float) -> Array:
    """One Adam step (moments updated in place); returns the change to subtract."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    first *= beta1
    first += (1 - beta1) * grad
    second *= beta2
    second += (1 - beta2) * grad * grad
    corrected_first = first / (1 - beta1**step)
    corrected_second = second / (1 - beta2**step)
    change: Array = lr * corrected_first / (np.sqrt(corrected_second) + eps)
    return change
