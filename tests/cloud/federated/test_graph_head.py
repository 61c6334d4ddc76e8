"""The head inside the FP32 graph: found where the devices train it, replaced exactly,
and refused where numpy training would not match the graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from cloud.federated.head import find_head, replace_head
from cloud.pipeline.evaluate import run_model
from shared.errors import InvalidInput
from tests.federated_support import edge_model

TRAINABLE = ["head.weight", "head.bias"]


def test_the_reference_edge_head_is_found_and_replaced() -> None:
    """A new head written in gives probabilities = softmax(embedding @ W + b)."""
    head = find_head(edge_model(), TRAINABLE, "embedding")
    assert (head.weight_name, head.bias_name, head.layout) == ("head.weight", "head.bias", "in_out")
    assert head.weight.shape == (32, 10)
    assert head.classes == 10
    rng = np.random.default_rng(0)
    new = {"head.weight": rng.normal(size=(32, 10)), "head.bias": rng.normal(size=10)}
    model = replace_head(edge_model(), new)
    x = {"input": rng.uniform(0, 16, (5, 64)).astype(np.float32)}
    embedding = run_model(model, x, output="embedding")
    logits = embedding @ new["head.weight"] + new["head.bias"]
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(run_model(model, x, output="probabilities"), expected, atol=1e-5)
    # Everything else is the base's: the same embedding.
    np.testing.assert_allclose(embedding, run_model(edge_model(), x, output="embedding"))


def test_a_head_of_another_shape_or_with_nan_is_refused() -> None:
    with pytest.raises(InvalidInput, match="is \\[10, 32\\]"):
        replace_head(edge_model(), {"head.weight": np.zeros((10, 32))})
    with pytest.raises(InvalidInput, match="NaN"):
        replace_head(edge_model(), {"head.bias": np.full(10, np.nan)})
    with pytest.raises(InvalidInput, match="no initializer"):
        replace_head(edge_model(), {"other": np.zeros(3)})


def _edit(attribute: str, value: float) -> bytes:
    model = onnx.load_from_string(edge_model())
    for node in model.graph.node:
        if "head.weight" in node.input:
            node.attribute.append(helper.make_attribute(attribute, value))
    return model.SerializeToString()


def test_graphs_numpy_training_would_not_match_are_refused() -> None:
    with pytest.raises(InvalidInput, match="alpha=1"):
        find_head(_edit("alpha", 2.0), TRAINABLE, "embedding")
    with pytest.raises(InvalidInput, match="no output 'features'"):
        find_head(edge_model(), TRAINABLE, "features")
    with pytest.raises(InvalidInput, match="no Gemm"):
        find_head(edge_model(), ["layer0.bias"], "embedding")
    with pytest.raises(InvalidInput, match="reads 'hidden0'"):
        find_head(edge_model(), ["layer1.weight", "layer1.bias"], "embedding")
