"""KServe v2 REST as Triton's own HTTP client speaks it: health, metadata, inference in
JSON and binary tensors, versions by number and "latest"."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference
from tests.conftest import ADMIN_TOKEN
from tests.onnx_models import tiny_classifier


def auth() -> dict[str, str]:
    # A new dict each call: tritonclient writes its own headers into the one it is given.
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, FEATURES)).astype(np.float32)


def _expected(seed: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(tiny_classifier(features=FEATURES, classes=3, seed=seed))
    return np.asarray(session.run(["probabilities"], {"input": x})[0])


def _infer(
    client: httpclient.InferenceServerClient, x: np.ndarray, *, binary: bool, version: str = ""
) -> httpclient.InferResult:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    return client.infer(MODEL, [tensor], model_version=version, outputs=wanted, headers=auth())


def test_tritonclient_reads_health_and_metadata(inference: RunningInference) -> None:
    """Triton's HTTP client sees a live, ready server and the model's inputs and outputs,
    with every registered version listed."""
    client = httpclient.InferenceServerClient(inference.host_port)
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_model_metadata(MODEL, headers=auth())
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert meta["outputs"][0]["name"] == "probabilities"
    assert client.is_model_ready(MODEL, "1", headers=auth())
    client.close()


def test_binary_and_json_give_the_model_s_answer(inference: RunningInference) -> None:
    """The same rows sent as binary and as JSON tensors come back equal, and equal to the
    model run directly; "latest" is the highest version (2)."""
    x = _rows(5)
    client = httpclient.InferenceServerClient(inference.host_port)
    binary = _infer(client, x, binary=True)
    as_json = _infer(client, x, binary=False)
    client.close()
    assert binary.get_response()["model_version"] == "2"
    np.testing.assert_array_equal(
        binary.as_numpy("probabilities"), as_json.as_numpy("probabilities")
    )
    np.testing.assert_allclose(binary.as_numpy("probabilities"), _expected(2, x), rtol=1e-5)


def test_a_version_by_number_is_that_version(inference: RunningInference) -> None:
    """versions/1 answers with version 1's weights, not the latest's."""
    x = _rows(3, seed=4)
    client = httpclient.InferenceServerClient(inference.host_port)
    result = _infer(client, x, binary=True, version="1")
    client.close()
    assert result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("probabilities"), _expected(1, x), rtol=1e-5)


def test_unknown_model_or_version_is_404(inference: RunningInference) -> None:
    """An unknown model and an unknown version are 404 with the reason in {"error"}."""
    with inference.client() as c:
        missing = c.post("/v2/models/nope/infer", json={"inputs": []})
        assert missing.status_code == 404
        assert "nope" in missing.json()["error"]
        version = c.get(f"/v2/models/{MODEL}/versions/9")
        assert version.status_code == 404
        assert "no version 9" in version.json()["error"]
    client = httpclient.InferenceServerClient(inference.host_port)
    with pytest.raises(InferenceServerException, match="nope"):
        client.get_model_metadata("nope", headers=auth())
    client.close()
