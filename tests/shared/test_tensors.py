"""KServe v2 tensors over JSON and Triton's binary extension."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import TensorError
from shared.tensors import (
    HEADER_LENGTH,
    InferResponse,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.bool_])
def test_requests_round_trip_in_both_encodings(binary: bool, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    body, headers = encode_request({"x": array}, binary=binary, outputs=["y"])
    length = int(headers[HEADER_LENGTH]) if HEADER_LENGTH in headers else None
    request = decode_request(body, length)
    assert request.inputs["x"].dtype == array.dtype
    np.testing.assert_array_equal(request.inputs["x"], array)
    assert request.outputs[0].name == "y"
    assert request.outputs[0].binary is binary


def test_bytes_tensors_round_trip_in_binary() -> None:
    words = np.array([b"hello", b"", "wörld".encode()], dtype=np.object_)
    body, headers = encode_request({"text": words}, binary=True)
    request = decode_request(body, int(headers[HEADER_LENGTH]))
    assert list(request.inputs["text"]) == list(words)


def test_responses_mix_binary_and_json_outputs() -> None:
    probs = np.array([[0.1, 0.9]], dtype=np.float32)
    label = np.array([1], dtype=np.int64)
    response = InferResponse("m", {"probs": probs, "label": label}, model_version="2", id="r1")
    body, headers = encode_response(response, binary={"probs"})
    parsed = decode_response(body, int(headers[HEADER_LENGTH]))
    np.testing.assert_array_equal(parsed.outputs["probs"], probs)
    np.testing.assert_array_equal(parsed.outputs["label"], label)
    assert (parsed.model_version, parsed.id) == ("2", "r1")
    header = json.loads(body[: int(headers[HEADER_LENGTH])])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == 8


def test_nested_json_data_is_accepted_like_triton() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    ).encode()
    assert decode_request(body).inputs["x"].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"{not json", "malformed JSON"),
        (b"[]", "JSON object"),
        (b'{"inputs": []}', "non-empty"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1]}]}', "needs 3"),
        (b'{"inputs": [{"name": "x", "datatype": "FP99", "shape": [1], "data": [1]}]}', "unknown"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [-1], "data": [1]}]}', "shape"),
        (
            b'{"inputs": [{"name": "x", "datatype": "INT8", "shape": [1], "data": ["a"]}]}',
            "not INT8",
        ),
        (b'{"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}', "without a name"),
        (b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}', "neither"),
    ],
)
def test_bad_json_requests_get_a_clear_error(body: bytes, match: str) -> None:
    with pytest.raises(TensorError, match=match):
        decode_request(body)


def test_binary_sizes_must_match_the_body_exactly() -> None:
    body, headers = encode_request({"x": np.zeros((2, 2), np.float32)}, binary=True)
    length = int(headers[HEADER_LENGTH])
    with pytest.raises(TensorError, match="exceeds the body"):
        decode_request(body[:-1], length)
    with pytest.raises(TensorError, match="unclaimed"):
        decode_request(body + b"\0", length)
    with pytest.raises(TensorError, match="outside"):
        decode_request(body, len(body) + 10)


def test_a_tensor_over_the_element_limit_is_refused_before_allocation() -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [100000, 100000], "data": [0]}]}
    ).encode()
    with pytest.raises(TensorError, match="exceed the limit"):
        decode_request(body, max_elements=1000)
