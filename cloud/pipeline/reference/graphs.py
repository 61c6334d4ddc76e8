"""ONNX graphs for the reference classifiers, written from trained numpy weights.

Every classifier takes raw pixels ``input`` [N, 64] (0..16) and gives ``probabilities``
[N, 10]; the edge models also give ``embedding``, and their classifier head is the pair
of named initializers ``head.weight`` / ``head.bias`` (what federated learning trains).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["HEAD_BIAS", "HEAD_WEIGHT", "mlp_classifier", "rbf_svm_classifier"]

HEAD_WEIGHT = "head.weight"
HEAD_BIAS = "head.bias"
OPSET = 17
Array = npt.NDArray[Any]


def _init(name: str, value: Array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def _finish(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    outputs: list[onnx.ValueInfoProto],
    name: str,
    features: int,
) -> bytes:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    model.producer_name = "edgefleet"
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data


def mlp_classifier(
    *,
    hidden: list[tuple[Array, Array]],
    head: tuple[Array, Array],
    features: int = 64,
    pool: int | None = None,
    scale: float = 1.0 / 16.0,
    name: str = "mlp",
) -> bytes:
    """x*scale [-> avg-pool] -> (Gemm+ReLU)* -> embedding -> head (Gemm) -> softmax.

    Gemm rather than MatMul+Add: its bias is quantized as int32 with the product's scale,
    where a separate Add would quantize the bias to 8 bits like an activation.
    """
    nodes = [helper.make_node("Mul", ["input", "scale"], ["scaled"])]
    inits = [_init("scale", np.array(scale))]
    current = "scaled"
    if pool is not None:
        # Average-pool the 8x8 image to (8/pool)^2 cells: a weaker view of the same input.
        side = round(features**0.5)
        inits += [
            helper.make_tensor("image_shape", TensorProto.INT64, [4], [-1, 1, side, side]),
            helper.make_tensor("flat_shape", TensorProto.INT64, [2], [-1, (side // pool) ** 2]),
        ]
        nodes += [
            helper.make_node("Reshape", [current, "image_shape"], ["image"]),
            helper.make_node(
                "AveragePool",
                ["image"],
                ["pooled_image"],
                kernel_shape=[pool, pool],
                strides=[pool, pool],
            ),
            helper.make_node("Reshape", ["pooled_image", "flat_shape"], ["pooled"]),
        ]
        current = "pooled"
    for i, (weight, bias) in enumerate(hidden):
        out = "embedding" if i == len(hidden) - 1 else f"hidden{i}"
        inits += [_init(f"layer{i}.weight", weight), _init(f"layer{i}.bias", bias)]
        nodes += [
            helper.make_node("Gemm", [current, f"layer{i}.weight", f"layer{i}.bias"], [f"pre{i}"]),
            helper.make_node("Relu", [f"pre{i}"], [out]),
        ]
        current = out
    inits += [_init(HEAD_WEIGHT, head[0]), _init(HEAD_BIAS, head[1])]
    nodes += [
        helper.make_node("Gemm", [current, HEAD_WEIGHT, HEAD_BIAS], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    classes = head[0].shape[1]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes]),
        helper.make_tensor_value_info(
            "embedding", TensorProto.FLOAT, ["batch", hidden[-1][0].shape[1]]
        ),
    ]
    return _finish(nodes, inits, outputs, name, features)


def rbf_svm_classifier(
    *,
    support: Array,
    coefficients: Array,
    intercepts: Array,
    gamma: float,
    temperature: float,
    scale: float = 1.0 / 16.0,
    name: str = "rbf_svm",
) -> bytes:
    """One-vs-rest RBF SVM: softmax(temperature * (exp(-gamma*|x-sv|^2) @ coef + b)).

    |x - sv|^2 is expanded as |x|^2 - 2 x.sv + |sv|^2 so it is one MatMul.
    """
    sv = np.asarray(support, dtype=np.float32)
    inits = [
        _init("scale", np.array(scale)),
        _init("sv_t", sv.T),
        _init("sv_sq", (sv**2).sum(axis=1)),
        _init("minus_two", np.array(-2.0)),
        _init("minus_gamma", np.array(-gamma)),
        _init("coef", coefficients),
        _init("intercept", intercepts),
        _init("temperature", np.array(temperature)),
        helper.make_tensor("axes1", TensorProto.INT64, [1], [1]),
    ]
    nodes = [
        helper.make_node("Mul", ["input", "scale"], ["x"]),
        helper.make_node("Mul", ["x", "x"], ["x2"]),
        helper.make_node("ReduceSum", ["x2", "axes1"], ["x_sq"], keepdims=1),
        helper.make_node("MatMul", ["x", "sv_t"], ["dot"]),
        helper.make_node("Mul", ["dot", "minus_two"], ["dot2"]),
        helper.make_node("Add", ["dot2", "x_sq"], ["d1"]),
        helper.make_node("Add", ["d1", "sv_sq"], ["dist"]),
        helper.make_node("Relu", ["dist"], ["dist_pos"]),  # rounding can go below zero
        helper.make_node("Mul", ["dist_pos", "minus_gamma"], ["neg"]),
        helper.make_node("Exp", ["neg"], ["kernel"]),
        helper.make_node("MatMul", ["kernel", "coef"], ["kc"]),
        helper.make_node("Add", ["kc", "intercept"], ["decision"]),
        helper.make_node("Mul", ["decision", "temperature"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    classes = np.asarray(coefficients).shape[1]
    outputs = [
        helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", classes])
    ]
    return _finish(nodes, inits, outputs, name, sv.shape[1])
