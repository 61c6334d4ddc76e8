"""The head a device trains in numpy: it learns, FedProx pulls it towards the global head,
the graph's two weight layouts give the same model, and it is deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.federated.head import TrainConfig, evaluate_head, train_head
from shared.errors import InvalidInput


def _task(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three separable classes in 8 dimensions and a head that knows nothing."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, 8))
    labels = rng.integers(0, 3, 300)
    x = (centres[labels] + rng.normal(0, 1, (300, 8))).astype(np.float32)
    return np.zeros((8, 3), np.float32), np.zeros(3, np.float32), x, labels


def test_training_lowers_the_loss_and_learns_the_classes() -> None:
    w, b, x, y = _task()
    update = train_head(w, b, x, y, TrainConfig(epochs=10))
    assert update.loss_after < update.loss_before
    assert update.accuracy_after > 0.9
    assert update.examples == 300
    assert evaluate_head(update.weight, update.bias, x, y)[1] == pytest.approx(
        update.accuracy_after
    )
    assert update.weight.dtype == np.float32


def test_the_same_inputs_give_the_same_update() -> None:
    w, b, x, y = _task()
    first = train_head(w, b, x, y, TrainConfig(seed=7))
    second = train_head(w, b, x, y, TrainConfig(seed=7))
    np.testing.assert_array_equal(first.weight, second.weight)
    other = train_head(w, b, x, y, TrainConfig(seed=8))
    assert not np.array_equal(first.weight, other.weight)


def test_fedprox_keeps_the_update_closer_to_the_global_head() -> None:
    """The proximal term mu/2 |w - w_global|^2 shrinks how far a device moves."""
    w, b, x, y = _task()
    plain = train_head(w, b, x, y, TrainConfig(optimizer="sgd", learning_rate=0.1))
    prox = train_head(w, b, x, y, TrainConfig(optimizer="sgd", learning_rate=0.1, proximal_mu=1.0))
    assert np.linalg.norm(prox.weight - w) < 0.8 * np.linalg.norm(plain.weight - w)


def test_a_transposed_gemm_weight_trains_to_the_transposed_result() -> None:
    """transB=1 heads store W as [classes, embedding]: the same model either way."""
    w, b, x, y = _task()
    w[0, 1] = 0.5
    in_out = train_head(w, b, x, y, TrainConfig(seed=3))
    out_in = train_head(w.T.copy(), b, x, y, TrainConfig(seed=3), layout="out_in")
    np.testing.assert_allclose(out_in.weight, in_out.weight.T, rtol=1e-6)
    np.testing.assert_allclose(out_in.bias, in_out.bias, rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w, b, x, y: (w, b, x[:, :5], y), "do not fit"),
        (lambda w, b, x, y: (w, b, x, y + 3), "labels must be in"),
        (lambda w, b, x, y: (w, b, x[:0], y[:0]), "no examples"),
        (lambda w, b, x, y: (w * np.nan, b, x, y), "NaN"),
        (lambda w, b, x, y: (w, b[:2], x, y), "do not fit together"),
    ],
)
def test_bad_inputs_are_refused(change: object, message: str) -> None:
    args = change(*_task())  # type: ignore[operator]
    with pytest.raises(InvalidInput, match=message):
        train_head(*args, TrainConfig())


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InvalidInput):
        TrainConfig(epochs=0)
    with pytest.raises(InvalidInput):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]
