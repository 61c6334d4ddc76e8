"""The digits reference models: interfaces, named head, and the accuracy ladder."""

from __future__ import annotations

import onnx
import pytest

from cloud.pipeline.evaluate import accuracy, run_model
from cloud.pipeline.inspect import inspect_onnx
from cloud.pipeline.reference.digits import digits_splits, shifted
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT


def _test_accuracy(model: bytes) -> float:
    splits = digits_splits(0)
    probs = run_model(model, {"input": splits.x_test}, output="probabilities")
    return accuracy(probs, splits.y_test)


@pytest.mark.parametrize("name", ["digits-edge", "digits-edge-weak"])
def test_edge_models_give_probabilities_embedding_and_a_named_head(
    reference_onnx: dict[str, bytes], name: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "m.onnx"
    path.write_bytes(reference_onnx[name])
    summary = inspect_onnx(path)
    assert [s.name for s in summary.inputs] == ["input"]
    assert summary.inputs[0].shape == [-1, 64]
    assert [s.name for s in summary.outputs] == ["probabilities", "embedding"]
    assert {HEAD_WEIGHT, HEAD_BIAS} <= summary.initializers
    graph = onnx.load_from_string(reference_onnx[name]).graph
    head = next(i for i in graph.initializer if i.name == HEAD_WEIGHT)
    assert head.dims[1] == 10


def test_the_accuracy_ladder_weak_edge_then_edge_then_cloud(
    reference_onnx: dict[str, bytes],
) -> None:
    weak = _test_accuracy(reference_onnx["digits-edge-weak"])
    edge = _test_accuracy(reference_onnx["digits-edge"])
    cloud = _test_accuracy(reference_onnx["digits-cloud"])
    assert 0.85 <= weak <= 0.95
    assert edge >= 0.965
    assert cloud >= 0.985
    assert weak < edge < cloud


def test_probabilities_are_a_distribution(reference_onnx: dict[str, bytes]) -> None:
    splits = digits_splits(0)
    for model in reference_onnx.values():
        probs = run_model(model, {"input": splits.x_test[:50]}, output="probabilities")
        assert probs.shape == (50, 10)
        assert abs(float(probs.sum(axis=1).mean()) - 1.0) < 1e-4


def test_splits_are_disjoint_stratified_and_seeded() -> None:
    a, b = digits_splits(0), digits_splits(0)
    assert (a.x_test == b.x_test).all()
    assert len(a.x_train) + len(a.x_calib) + len(a.x_test) == 1797
    assert set(a.y_calib.tolist()) == set(range(10))
    shifted_x, shifted_y = shifted(a.x_train[:3], a.y_train[:3])
    assert shifted_x.shape == (15, 64)
    assert (shifted_y[3:6] == a.y_train[:3]).all()


def test_minilm_without_the_models_extra_is_a_clear_422(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an install without torch (CI, devices) asking for MiniLM says what to install."""
    import sys

    from cloud.pipeline.reference.minilm import export_minilm
    from shared.errors import MissingExtra

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(MissingExtra, match=r"edgefleet\[models\]") as caught:
        export_minilm()
    assert caught.value.status_code == 422
