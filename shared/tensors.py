"""KServe v2 tensors: JSON and Triton's binary tensor extension, both directions.

Binary extension: the body is a JSON header whose length is given by the
``Inference-Header-Content-Length`` HTTP header, followed by the raw bytes of every
tensor whose ``parameters.binary_data_size`` is set, in order. BYTES tensors are
4-byte little-endian length-prefixed strings.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import PayloadTooLarge, TensorError

__all__ = [
    "HEADER_LENGTH",
    "InferRequest",
    "InferResponse",
    "RequestedOutput",
    "decode_request",
    "decode_response",
    "dtype_of",
    "encode_request",
    "encode_response",
]

HEADER_LENGTH = "Inference-Header-Content-Length"
Array = npt.NDArray[Any]

_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def dtype_of(datatype: str) -> np.dtype[Any]:
    try:
        return _DTYPES[datatype]
    except KeyError:
        raise TensorError(f"unknown datatype {datatype!r}") from None


def datatype_of(array: Array) -> str:
    if array.dtype.kind in "OSU":
        return "BYTES"
    try:
        return _NAMES[array.dtype]
    except KeyError:
        raise TensorError(f"unsupported numpy dtype {array.dtype}") from None


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(slots=True)
class InferRequest:
    inputs: dict[str, Array]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str | None = None
    binary_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    outputs: dict[str, Array]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def _split_body(body: bytes, header_length: int | None) -> tuple[dict[str, Any], memoryview]:
    if header_length is None:
        header_bytes, binary = body, b""
    else:
        if header_length < 0 or header_length > len(body):
            raise TensorError(f"{HEADER_LENGTH} {header_length} outside a {len(body)}-byte body")
        header_bytes, binary = body[:header_length], body[header_length:]
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorError(f"malformed JSON: {exc}") from exc
    except RecursionError:
        raise TensorError("malformed JSON: nested too deeply") from None
    if not isinstance(header, dict):
        raise TensorError("the request body must be a JSON object")
    return header, memoryview(binary)


def _is_int(value: Any) -> bool:
    # JSON true/false arrive as Python bools, which are ints: not a size, not a dimension.
    return isinstance(value, int) and not isinstance(value, bool)


def _flag(params: dict[str, Any], key: str, default: bool, where: str) -> bool:
    """A KServe boolean parameter: JSON true or false only (the string "false" is not false)."""
    value = params.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise TensorError(f"{where} {key} must be a JSON boolean (true or false), not {shown}")
    return value


def _shape(raw: Any, name: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or not all(_is_int(d) and d >= 0 for d in raw):
        raise TensorError(f"tensor {name!r}: shape must be a list of non-negative integers")
    return tuple(raw)


def _decode_bytes_tensor(raw: bytes, count: int, name: str) -> Array:
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"tensor {name!r}: truncated BYTES element")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise TensorError(f"tensor {name!r}: truncated BYTES element")
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise TensorError(f"tensor {name!r}: {len(items)} BYTES elements, shape needs {count}")
    return np.array(items, dtype=np.object_)


def _encode_bytes_tensor(array: Array) -> bytes:
    out = bytearray()
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode()
        out += struct.pack("<I", len(data)) + data
    return bytes(out)


def _decode_tensor(
    spec: Any, binary: memoryview, offset: int, *, max_elements: int, max_rows: int | None = None
) -> tuple[str, Array, int]:
    if not isinstance(spec, dict):
        raise TensorError("each tensor must be a JSON object")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise TensorError("tensor without a name")
    datatype = spec.get("datatype")
    if not isinstance(datatype, str):
        raise TensorError(f"tensor {name!r}: missing datatype")
    dtype = dtype_of(datatype)
    shape = _shape(spec.get("shape"), name)
    # Checked on the declared shape, before anything is converted or allocated.
    if max_rows is not None and shape and shape[0] > max_rows:
        raise PayloadTooLarge(
            f"tensor {name!r}: a batch of {shape[0]} rows exceeds the limit of {max_rows}"
        )
    count = int(np.prod(shape, dtype=np.int64))
    if count > max_elements:
        raise TensorError(f"tensor {name!r}: {count} elements exceed the limit of {max_elements}")
    params = spec.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError(f"tensor {name!r}: parameters must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not _is_int(size) or size < 0 or offset + size > len(binary):
            raise TensorError(f"tensor {name!r}: binary_data_size {size!r} exceeds the body")
        raw = bytes(binary[offset : offset + size])
        offset += size
        if datatype == "BYTES":
            array = _decode_bytes_tensor(raw, count, name)
        else:
            if size != count * dtype.itemsize:
                raise TensorError(
                    f"tensor {name!r}: {size} bytes, shape {list(shape)} of {datatype} "
                    f"needs {count * dtype.itemsize}"
                )
            array = np.frombuffer(raw, dtype=dtype).copy()
    else:
        if "data" not in spec:
            raise TensorError(f"tensor {name!r}: neither data nor binary_data_size")
        try:
            if datatype == "BYTES":
                flat = np.array(
                    [s.encode() if isinstance(s, str) else s for s in np.ravel(spec["data"])],
                    dtype=np.object_,
                )
            else:
                flat = np.asarray(spec["data"], dtype=dtype).reshape(-1)
        except (ValueError, TypeError, OverflowError) as exc:
            raise TensorError(f"tensor {name!r}: data is not {datatype}: {exc}") from exc
        if flat.size != count:
            raise TensorError(
                f"tensor {name!r}: {flat.size} values, shape {list(shape)} needs {count}"
            )
        array = flat
    return name, array.reshape(shape), offset


def decode_request(
    body: bytes,
    header_length: int | None = None,
    *,
    max_elements: int = 1 << 26,
    max_rows: int | None = None,
) -> InferRequest:
    header, binary = _split_body(body, header_length)
    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise TensorError("'inputs' must be a non-empty list")
    inputs: dict[str, Array] = {}
    offset = 0
    for spec in raw_inputs:
        name, array, offset = _decode_tensor(
            spec, binary, offset, max_elements=max_elements, max_rows=max_rows
        )
        if name in inputs:
            raise TensorError(f"input {name!r} given twice")
        inputs[name] = array
    if offset != len(binary):
        raise TensorError(f"{len(binary) - offset} unclaimed bytes after the tensors")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise TensorError("'parameters' must be an object")
    binary_default = _flag(params, "binary_data_output", False, "parameters")
    outputs: list[RequestedOutput] = []
    for spec in header.get("outputs") or []:
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TensorError("each requested output needs a name")
        out_params = spec.get("parameters") or {}
        if not isinstance(out_params, dict):
            raise TensorError("output parameters must be an object")
        as_binary = _flag(out_params, "binary_data", binary_default, f"output {spec['name']!r}")
        outputs.append(RequestedOutput(spec["name"], as_binary))
    request_id = header.get("id")
    return InferRequest(
        inputs=inputs,
        outputs=outputs,
        id=str(request_id) if request_id is not None else None,
        binary_output=binary_default,
        parameters=params,
    )


def _tensor_header(name: str, array: Array) -> dict[str, Any]:
    return {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}


def _to_json_data(array: Array) -> list[Any]:
    if array.dtype == np.object_:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    flat: list[Any] = array.reshape(-1).tolist()
    return flat


def _encode(
    header: dict[str, Any], key: str, tensors: Sequence[tuple[str, Array, bool]]
) -> tuple[bytes, dict[str, str]]:
    blobs: list[bytes] = []
    entries = []
    for name, array, binary in tensors:
        entry = _tensor_header(name, array)
        if binary:
            blob = (
                _encode_bytes_tensor(array)
                if array.dtype == np.object_
                else np.ascontiguousarray(array).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _to_json_data(array)
        entries.append(entry)
    header[key] = entries
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        HEADER_LENGTH: str(len(head)),
        "Content-Type": "application/octet-stream",
    }


def encode_request(
    inputs: Mapping[str, Array],
    *,
    binary: bool = True,
    outputs: Sequence[str] = (),
    binary_output: bool | None = None,
    request_id: str | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Client side: a request body and its headers."""
    out_binary = binary if binary_output is None else binary_output
    header: dict[str, Any] = {}
    if request_id is not None:
        header["id"] = request_id
    if outputs:
        header["outputs"] = [
            {"name": n, "parameters": {"binary_data": out_binary}} for n in outputs
        ]
    else:
        header["parameters"] = {"binary_data_output": out_binary}
    return _encode(header, "inputs", [(n, np.asarray(a), binary) for n, a in inputs.items()])


def encode_response(
    response: InferResponse, *, binary: bool | set[str] = False
) -> tuple[bytes, dict[str, str]]:
    """Server side: ``binary`` is all outputs, none, or the names to send as binary."""
    header: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        header["model_version"] = response.model_version
    if response.id is not None:
        header["id"] = response.id
    if response.parameters:
        header["parameters"] = response.parameters
    tensors = [
        (n, a, binary if isinstance(binary, bool) else n in binary)
        for n, a in response.outputs.items()
    ]
    return _encode(header, "outputs", tensors)


def decode_response(body: bytes, header_length: int | None = None) -> InferResponse:
    """Client side: parse a JSON or binary response."""
    header, binary = _split_body(body, header_length)
    if "error" in header:
        raise TensorError(str(header["error"]))
    outputs: dict[str, Array] = {}
    offset = 0
    for spec in header.get("outputs") or []:
        name, array, offset = _decode_tensor(spec, binary, offset, max_elements=1 << 30)
        outputs[name] = array
    return InferResponse(
        model_name=str(header.get("model_name", "")),
        model_version=header.get("model_version"),
        id=header.get("id"),
        outputs=outputs,
        parameters=header.get("parameters") or {},
    )
