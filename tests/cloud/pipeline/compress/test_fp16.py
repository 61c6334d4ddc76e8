"""FP16 conversion on the graph: a graph with subgraphs is refused with the reason (the
converter misplaces their casts), and what a float-kept op computes reaches the outputs
without a round trip through FP16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.pipeline.compress.fp16 import to_fp16
from cloud.pipeline.evaluate import run_model
from shared.errors import InvalidInput

FEATURES, CLASSES = 64, 10


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto]) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def _weights(scale: float) -> onnx.TensorProto:
    rng = np.random.default_rng(0)
    return numpy_helper.from_array(
        rng.normal(0, scale, (FEATURES, CLASSES)).astype(np.float32), "w"
    )


def _rows() -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(1).normal(size=(8, FEATURES)).astype(np.float32)}


def test_a_model_with_an_if_is_refused_with_the_reason() -> None:
    """onnxruntime's converter puts the casts of an If branch's values in the outer graph,
    where they read names that only exist inside the branch (and blocking the If leaves
    the branch's float ops reading FP16 values): a valid model with subgraphs is refused
    for that reason up front, not as a broken graph after conversion."""

    def branch(name: str) -> onnx.GraphProto:
        out = f"p_{name}"
        return helper.make_graph(
            [helper.make_node("Softmax", ["h"], [out], axis=-1)],
            name,
            [],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
        )

    model = _model(
        [
            helper.make_node("MatMul", ["input", "w"], ["h"]),
            helper.make_node(
                "If",
                ["cond"],
                ["probabilities"],
                then_branch=branch("then"),
                else_branch=branch("else"),
            ),
        ],
        [_weights(0.1), numpy_helper.from_array(np.array(True), "cond")],
    )
    assert run_model(model, _rows(), output="probabilities").shape == (8, CLASSES)
    with pytest.raises(InvalidInput, match=r"subgraphs \(If\)"):
        to_fp16(model)
