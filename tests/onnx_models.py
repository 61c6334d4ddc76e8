"""Tiny ONNX models built in code for tests that need a valid graph, not a trained one."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_classifier(*, features: int = 4, classes: int = 3, seed: int = 0) -> bytes:
    """x[N,features] -> probabilities[N,classes] through a named head (head.weight, head.bias)."""
    rng = np.random.default_rng(seed)
    weight = numpy_helper.from_array(
        rng.normal(size=(features, classes)).astype(np.float32), "head.weight"
    )
    bias = numpy_helper.from_array(rng.normal(size=(classes,)).astype(np.float32), "head.bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "head.weight"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "head.bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        [weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
