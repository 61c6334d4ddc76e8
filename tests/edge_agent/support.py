"""Small real ONNX models, manifests and signed documents for the agent's unit tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

from cloud.embedded.processes import free_port
from edge_agent.config import AgentSettings
from edge_agent.model_store import ModelStore
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredState,
    GoldenExample,
    HealthCheckSpec,
    Manifest,
    RoutingSpec,
    TensorSpec,
)
from shared.signing import generate_key, public_key_b64, sign
from tests.onnx_models import tiny_classifier

__all__ = [
    "CHUNK",
    "DEVICE",
    "agent_settings",
    "golden_for",
    "identity_model",
    "lookup_model",
    "manifest_for",
    "put_blob",
    "signed_document",
    "tiny_classifier",
    "wait_for",
]

CHUNK = 1024
DEVICE = "cam-unit"


def _model(graph: onnx.GraphProto) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def identity_model(classes: int = 3) -> bytes:
    """input[N,classes] -> probabilities (the same values): the router sees exactly what it is
    fed, so a test chooses the probabilities a policy decides on."""
    return _model(
        helper.make_graph(
            [helper.make_node("Identity", ["input"], ["probabilities"])],
            "identity",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", classes])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
        )
    )


def lookup_model(rows: int = 10, classes: int = 3) -> bytes:
    """index[N] (INT64) -> probabilities[N,classes] by a table lookup: a valid graph that the
    engine refuses at run time for an index outside the table (an onnxruntime error)."""
    table = np.random.default_rng(0).random((rows, classes)).astype(np.float32)
    return _model(
        helper.make_graph(
            [
                helper.make_node("Gather", ["table", "index"], ["scores"], axis=0),
                helper.make_node("Softmax", ["scores"], ["probabilities"], axis=-1),
            ],
            "lookup",
            [helper.make_tensor_value_info("index", TensorProto.INT64, ["N"])],
            [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes])],
            [numpy_helper.from_array(table, "table")],
        )
    )


def golden_for(data: bytes, inputs: dict[str, Any]) -> GoldenExample:
    """A golden example: one row through the model itself, as the pipeline computes it."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    types = {i.name: np.int64 if "int64" in i.type else np.float32 for i in session.get_inputs()}
    feed = {
        name: np.asarray(values, dtype=types[name])[None, ...] for name, values in inputs.items()
    }
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, feed), strict=True))
    return GoldenExample(
        inputs={k: np.asarray(v, dtype=np.float64).reshape(-1).tolist() for k, v in inputs.items()},
        outputs={k: v.astype(np.float64).reshape(-1).tolist() for k, v in outputs.items()},
    )


def manifest_for(
    data: bytes,
    *,
    model: str = "m",
    version: int = 1,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    golden: list[GoldenExample] | None = None,
    routing: RoutingSpec | None = None,
) -> Manifest:
    """A manifest for ``data``; IO defaults to tiny_classifier's (input[N,4] -> [N,3])."""
    return Manifest(
        model=model,
        version=version,
        precision="fp32",
        artifact=ArtifactRef.of(data, CHUNK),
        inputs=inputs or [TensorSpec(name="input", datatype="FP32", shape=[-1, 4])],
        outputs=outputs or [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3])],
        routing=routing,
        healthcheck=HealthCheckSpec(golden=golden or []),
    )


def put_blob(store: ModelStore, data: bytes, ref: ArtifactRef) -> Path:
    """Write ``data`` chunk by chunk into ``store`` and finish it, as a download would."""
    for index in range(len(ref.chunks)):
        assert store.write_chunk(ref, index, data[index * CHUNK : (index + 1) * CHUNK])
    return store.finish(ref)


def signed_document(
    key: Ed25519PrivateKey, rev: int, *manifests: Manifest, rollout_id: int | None = None
) -> bytes:
    now = datetime.now(UTC)
    state = DesiredState(
        device_id=DEVICE,
        rev=rev,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        deployments=[Deployment(manifest=m, rollout_id=rollout_id) for m in manifests],
    )
    return sign(state, key).model_dump_json().encode()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def agent_settings(data_dir: Path, **overrides: Any) -> AgentSettings:
    """Settings for a real Agent whose broker and cloud are free ports nobody listens on
    (until a test starts something there)."""
    values: dict[str, Any] = {
        "device_id": DEVICE,
        "token": "device-token-123",
        "cloud_url": f"http://127.0.0.1:{free_port()}",
        "mqtt_url": f"mqtt://127.0.0.1:{free_port()}",
        "public_key": public_key_b64(generate_key().public_key()),
        "data_dir": data_dir,
        "api_port": 0,
    }
    return AgentSettings(**(values | overrides))
