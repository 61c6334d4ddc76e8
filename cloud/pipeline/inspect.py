"""Check an ONNX file and read its IO spec and initializer names from the graph itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx

from shared.errors import ModelInvalid
from shared.messages import TensorSpec

__all__ = ["OnnxSummary", "inspect_onnx"]

_DATATYPES: dict[int, str] = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True, slots=True)
class OnnxSummary:
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    initializers: frozenset[str]
    opset: int


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    datatype = _DATATYPES.get(tensor.elem_type)
    if datatype is None:
        raise ModelInvalid(f"tensor {value.name!r} has unsupported element type {tensor.elem_type}")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return TensorSpec.model_validate({"name": value.name, "datatype": datatype, "shape": shape})


def inspect_onnx(path: Path) -> OnnxSummary:
    """Raise :class:`ModelInvalid` with the checker's words for anything that is not a model."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises several unrelated types for a bad file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInvalid(f"not a valid ONNX model: {first_line[:300]}") from exc
    initializers = frozenset(i.name for i in model.graph.initializer)
    inputs = [_spec(v) for v in model.graph.input if v.name not in initializers]
    outputs = [_spec(v) for v in model.graph.output]
    if not inputs or not outputs:
        raise ModelInvalid("the model has no inputs or no outputs")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return OnnxSummary(inputs, outputs, initializers, opset)
