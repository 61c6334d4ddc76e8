"""FP16 conversion on the graph: a graph with subgraphs is refused with the reason (the
converter misplaces their casts), and what a float-kept op computes reaches the outputs
without a round trip through FP16."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.pipeline.compress.fp16 import io_types, to_fp16
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


def test_a_float_kept_softmax_reaches_the_output_in_float() -> None:
    """Softmax stays in float; its result goes straight to the FP32 output, not through a
    Cast to FP16 and back (which flushes probabilities under ~6e-8 to 0 and costs two
    kernels): no output is made by a Cast of a Cast, and the small probabilities survive."""
    model = _model(
        [
            helper.make_node("MatMul", ["input", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        [_weights(1.0)],
    )
    half = to_fp16(model)
    graph = onnx.load_from_string(half).graph
    made_by = {o: n for n in graph.node for o in n.output}
    for output in graph.output:
        node = made_by[output.name]
        before = made_by.get(node.input[0]) if node.input else None
        assert not (node.op_type == "Cast" and before is not None and before.op_type == "Cast")
    assert io_types(half) == io_types(model)
    full = run_model(model, _rows(), output="probabilities")
    small = (full > 1e-20) & (full < 6e-8)
    assert small.sum() >= 5  # the weights make some classes very unlikely
    got = run_model(half, _rows(), output="probabilities")
    assert (got[small] > 0).all()
    np.testing.assert_allclose(got, full, atol=2e-3)
