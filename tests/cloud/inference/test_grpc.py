"""KServe v2 gRPC as Triton's gRPC client speaks it, behind the same service as REST."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference
from tests.conftest import ADMIN_TOKEN

AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def _x(n: int = 6) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, FEATURES)).astype(np.float32)


def test_tritonclient_grpc_reads_health_and_metadata(inference: RunningInference) -> None:
    """ServerLive/Ready, ModelReady and ModelMetadata answer as Triton's do."""
    client = grpcclient.InferenceServerClient(inference.grpc)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL, headers=dict(AUTH))
    meta = client.get_model_metadata(MODEL, headers=dict(AUTH))
    assert meta.name == MODEL
    assert list(meta.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("input", "FP32", [-1, FEATURES])
    ]
    client.close()


def test_rest_and_grpc_give_the_same_answer(inference: RunningInference) -> None:
    """The same rows through gRPC and through REST binary come back identical."""
    x = _x()
    grpc_client = grpcclient.InferenceServerClient(inference.grpc)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    by_grpc = grpc_client.infer(MODEL, [tensor], model_version="1", headers=dict(AUTH))
    grpc_client.close()
    http_client = httpclient.InferenceServerClient(inference.host_port)
    rest_tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    rest_tensor.set_data_from_numpy(x)
    by_rest = http_client.infer(MODEL, [rest_tensor], model_version="1", headers=dict(AUTH))
    http_client.close()
    assert by_grpc.get_response().model_version == "1"
    np.testing.assert_array_equal(
        by_grpc.as_numpy("probabilities"), by_rest.as_numpy("probabilities")
    )


@pytest.mark.parametrize(
    ("model", "shape", "datatype", "code"),
    [
        ("nope", [2, FEATURES], "FP32", "StatusCode.NOT_FOUND"),
        (MODEL, [2, FEATURES + 1], "FP32", "StatusCode.INVALID_ARGUMENT"),
        (MODEL, [2, FEATURES], "FP64", "StatusCode.INVALID_ARGUMENT"),
    ],
)
def test_grpc_errors_carry_the_status_and_reason(
    inference: RunningInference, model: str, shape: list[int], datatype: str, code: str
) -> None:
    """Unknown model, wrong shape, wrong datatype: a gRPC status with the same reason REST
    gives, and the server goes on answering."""
    client = grpcclient.InferenceServerClient(inference.grpc)
    dtype = np.float64 if datatype == "FP64" else np.float32
    tensor = grpcclient.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=dtype))
    with pytest.raises(InferenceServerException) as failed:
        client.infer(model, [tensor], headers=dict(AUTH))
    assert failed.value.status() == code
    assert failed.value.message()
    assert client.is_server_live()
    client.close()


def test_grpc_needs_a_token(inference: RunningInference) -> None:
    """Without a bearer token, inference over gRPC is UNAUTHENTICATED."""
    client = grpcclient.InferenceServerClient(inference.grpc)
    tensor = grpcclient.InferInput("input", [1, FEATURES], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, FEATURES), dtype=np.float32))
    with pytest.raises(InferenceServerException) as failed:
        client.infer(MODEL, [tensor])
    assert failed.value.status() == "StatusCode.UNAUTHENTICATED"
    client.close()
