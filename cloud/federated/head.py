"""The trainable head inside an FP32 ONNX graph: find it (a Gemm on the embedding output whose
weight and bias are the manifest's trainable initializers), read it, and write a new one in.

Devices train ``logits = embedding @ W + b`` in numpy; that is only the graph's head if the
Gemm reads the embedding output directly with alpha = beta = 1 and no transposed input A,
so anything else is refused before a run starts rather than producing a wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import numpy_helper

from shared.errors import InvalidInput

__all__ = ["Head", "find_head", "replace_head"]

Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Head:
    weight_name: str
    bias_name: str
    layout: Literal["in_out", "out_in"]
    weight: Array
    bias: Array

    @property
    def arrays(self) -> dict[str, Array]:
        return {self.weight_name: self.weight, self.bias_name: self.bias}

    @property
    def classes(self) -> int:
        return int(self.bias.shape[0])


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def find_head(model: bytes, trainable: list[str], embedding_output: str) -> Head:
    """The head the devices train; :class:`InvalidInput` saying why a graph has none."""
    graph = onnx.load_from_string(model).graph
    inits = {i.name: i for i in graph.initializer}
    if embedding_output not in {o.name for o in graph.output}:
        raise InvalidInput(f"the model has no output {embedding_output!r} to train a head on")
    for node in graph.node:
        if node.op_type != "Gemm" or len(node.input) < 3 or node.input[1] not in trainable:
            continue
        weight_name, bias_name = node.input[1], node.input[2]
        attrs = _attributes(node)
        if node.input[0] != embedding_output:
            raise InvalidInput(
                f"the trainable Gemm {node.name or weight_name!r} reads {node.input[0]!r}, "
                f"not the embedding output {embedding_output!r}"
            )
        if (
            attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            raise InvalidInput("the head Gemm must have transA=0, alpha=1, beta=1")
        if bias_name not in trainable or weight_name not in inits or bias_name not in inits:
            raise InvalidInput(
                f"the head's weight and bias ({weight_name!r}, {bias_name!r}) must both be "
                "trainable initializers"
            )
        weight = numpy_helper.to_array(inits[weight_name])
        bias = numpy_helper.to_array(inits[bias_name])
        layout: Literal["in_out", "out_in"] = "out_in" if attrs.get("transB", 0) else "in_out"
        classes = weight.shape[1] if layout == "in_out" else weight.shape[0]
        if weight.ndim != 2 or bias.shape != (classes,):
            raise InvalidInput(f"head shapes {weight.shape} and {bias.shape} do not fit together")
        if weight.dtype != np.float32 or bias.dtype != np.float32:
            raise InvalidInput("the head must be float32 (train the FP32 version, not INT8)")
        return Head(weight_name, bias_name, layout, weight, bias)
    raise InvalidInput(
        f"no Gemm in the graph uses the trainable tensors {trainable} as its weight: "
        "federated learning trains a classifier head on the embedding"
    )


def replace_head(model: bytes, head: dict[str, Array]) -> bytes:
    """``model`` with the named initializers replaced (same shapes, float32, finite)."""
    proto = onnx.load_from_string(model)
    inits = {i.name: i for i in proto.graph.initializer}
    for name, value in head.items():
        if name not in inits:
            raise InvalidInput(f"the graph has no initializer {name!r}")
        old = numpy_helper.to_array(inits[name])
        new = np.asarray(value, dtype=np.float32)
        if new.shape != old.shape:
            raise InvalidInput(f"{name!r} is {list(new.shape)}, the graph's is {list(old.shape)}")
        if not np.isfinite(new).all():
            raise InvalidInput(f"{name!r} has NaN or infinite values")
        inits[name].CopyFrom(numpy_helper.from_array(new, name))
    onnx.checker.check_model(proto, full_check=True)
    data: bytes = proto.SerializeToString()
    return data
