"""Every malformed KServe v2 request gets a 4xx with {"error": <a clear reason>}, and the
server answers the next request as if nothing happened."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference

INFER = f"/v2/models/{MODEL}/infer"


def _json(
    shape: list[int], data: list[float] | str, datatype: str = "FP32", **extra: object
) -> bytes:
    body = {"inputs": [{"name": "input", "shape": shape, "datatype": datatype, "data": data}]}
    body.update(extra)
    text = json.dumps(body)
    return text.replace('"NaN-literal"', "NaN").encode()


def _binary(
    header: dict[str, object], blob: bytes, claimed: int | None = None
) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    length = len(head) if claimed is None else claimed
    return head + blob, {"Inference-Header-Content-Length": str(length)}


def _tensor(size: int, shape: list[int] | None = None) -> dict[str, object]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": shape or [2, FEATURES],
                "datatype": "FP32",
                "parameters": {"binary_data_size": size},
            }
        ]
    }


GOOD = np.ones((2, FEATURES), dtype=np.float32).tobytes()
INF = np.array([[np.inf] * FEATURES] * 2, dtype=np.float32).tobytes()

CASES: list[tuple[str, bytes, dict[str, str], int, str]] = [
    ("wrong shape", _json([2, 5], [0.0] * 10), {}, 400, "shape [2, 5]"),
    ("wrong dtype", _json([2, FEATURES], [0.0] * 8, "FP64"), {}, 400, "datatype FP64"),
    ("data length", _json([2, FEATURES], [0.0] * 7), {}, 400, "7 values"),
    ("NaN in JSON", _json([1, FEATURES], ["NaN-literal", 0, 0, 0]), {}, 400, "NaN"),
    ("inf in binary", *_binary(_tensor(len(INF)), INF), 400, "NaN or infinity"),
    ("unknown input", _json([1, 1], [0.0]).replace(b'"input"', b'"x"'), {}, 400, "unknown input"),
    ("empty batch", _json([0, FEATURES], []), {}, 400, "empty batch"),
    ("malformed JSON", b'{"inputs": [', {}, 400, "malformed JSON"),
    ("not an object", b"[1, 2]", {}, 400, "JSON object"),
    (
        "unknown output",
        _json([1, FEATURES], [0.0] * 4, outputs=[{"name": "nope"}]),
        {},
        400,
        "unknown output",
    ),
    (
        "string flag",
        _json([1, FEATURES], [0.0] * 4, parameters={"binary_data_output": "no"}),
        {},
        400,
        "JSON boolean",
    ),
    (
        "header longer than body",
        *_binary(_tensor(len(GOOD)), GOOD, claimed=10_000),
        400,
        "outside a",
    ),
    (
        "header not a number",
        GOOD,
        {"Inference-Header-Content-Length": "ten"},
        400,
        "non-negative integer",
    ),
    ("size past the body", *_binary(_tensor(len(GOOD) + 8), GOOD), 400, "exceeds the body"),
    ("bytes left over", *_binary(_tensor(len(GOOD) - 4), GOOD), 400, "bytes"),
    ("too many rows", _json([65, FEATURES], [0.0] * 65 * FEATURES), {}, 413, "limit of 64"),
    ("oversize body", _json([1, FEATURES], [0.0] * 4) + b" " * 70_000, {}, 413, "over the limit"),
]


@pytest.mark.parametrize(("body", "headers", "status", "words"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_a_malformed_request_is_a_clear_4xx_and_the_server_stays_up(
    inference: RunningInference, body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    """The refusal names what is wrong; the same connection then gets a real answer."""
    with inference.client() as c:
        refused = c.post(INFER, content=body, headers=headers)
        assert refused.status_code == status, refused.text
        assert words in refused.json()["error"]
        ok = c.post(INFER, content=_json([1, FEATURES], [0.5] * 4))
    assert ok.status_code == 200, ok.text
    assert np.asarray(ok.json()["outputs"][0]["data"]).shape == (3,)


def test_a_bad_version_is_400_and_no_token_is_401(inference: RunningInference) -> None:
    """A version that is no number is refused before any lookup; no token, no inference."""
    with inference.client() as c:
        bad = c.post(f"/v2/models/{MODEL}/versions/abc/infer", content=b"{}")
    assert bad.status_code == 400
    assert "positive integer" in bad.json()["error"]
    with inference.client(token=None) as anonymous:
        refused = anonymous.post(INFER, content=_json([1, FEATURES], [0.0] * 4))
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"


def test_bytes_tensors_are_refused_by_a_float_model(inference: RunningInference) -> None:
    """A BYTES tensor with length-prefixed elements decodes, then the datatype check says no."""
    blob = b"".join(struct.pack("<I", 1) + b"a" for _ in range(FEATURES))
    header = _tensor(len(blob), [1, FEATURES])
    header["inputs"][0]["datatype"] = "BYTES"  # type: ignore[index]
    body, headers = _binary(header, blob)
    with httpx.Client(base_url=inference.url, timeout=30) as c:
        refused = c.post(INFER, content=body, headers={**headers, "Authorization":
                         f"Bearer {inference.device_token}"})  # fmt: skip
    assert refused.status_code == 400
    assert "datatype BYTES" in refused.json()["error"]
