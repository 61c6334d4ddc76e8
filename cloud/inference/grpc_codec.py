"""KServe v2 gRPC messages ↔ the tensors the service checks: a ModelInferRequest becomes the
same JSON header + binary tensors the REST path decodes, so both refuse the same inputs
with the same words."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from shared.errors import TensorError
from shared.tensors import InferRequest, InferResponse, datatype_of, decode_request

__all__ = ["decode_infer_request", "encode_infer_response"]

# Which typed field of InferTensorContents holds each datatype (FP16 travels raw only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def _pack_bytes(items: Any) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + bytes(b) for b in items)


def decode_infer_request(request: Any, *, max_elements: int, max_rows: int | None) -> InferRequest:
    raws = list(request.raw_input_contents)
    if raws and len(raws) != len(request.inputs):
        raise TensorError(
            f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs: give one each"
        )
    blobs: list[bytes] = []
    specs: list[dict[str, Any]] = []
    for index, tensor in enumerate(request.inputs):
        spec: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if raws:
            blob: bytes | None = raws[index]
        elif tensor.datatype == "BYTES":
            blob = _pack_bytes(tensor.contents.bytes_contents)
        elif tensor.datatype in _CONTENTS:
            blob = None
            spec["data"] = list(getattr(tensor.contents, _CONTENTS[tensor.datatype]))
        else:
            raise TensorError(
                f"tensor {tensor.name!r}: {tensor.datatype or 'no datatype'} needs "
                "raw_input_contents"
            )
        if blob is not None:
            spec["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        specs.append(spec)
    header: dict[str, Any] = {
        "inputs": specs,
        "outputs": [{"name": o.name} for o in request.outputs],
    }
    if request.id:
        header["id"] = request.id
    head = json.dumps(header).encode()
    return decode_request(
        head + b"".join(blobs), len(head), max_elements=max_elements, max_rows=max_rows
    )


def encode_infer_response(response: InferResponse) -> Any:
    """Every output as raw_output_contents, as Triton answers."""
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version or "",
        id=response.id or "",
    )
    for name, array in response.outputs.items():
        tensor = message.outputs.add()
        tensor.name = name
        tensor.datatype = datatype_of(array)
        tensor.shape.extend(int(d) for d in array.shape)
        if array.dtype == np.object_:
            raw = _pack_bytes(
                x if isinstance(x, bytes) else str(x).encode() for x in array.reshape(-1)
            )
        else:
            raw = np.ascontiguousarray(array).tobytes()
        message.raw_output_contents.append(raw)
    return message
