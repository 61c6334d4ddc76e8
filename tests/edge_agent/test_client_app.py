"""The ClientApp, called directly with Flower messages (fast; the same app a SuperNode runs):
it says who the device is, trains the head on the device's buffer and sends back what
train_head computes, refuses below the minimum sample count, and refuses another backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from onnx import numpy_helper

from edge_agent.federated.client_app import REFUSED, app
from edge_agent.federated.head import TrainConfig, train_head
from edge_agent.federated.local import RoundPlan, embeddings, round_seed
from edge_agent.samples import SampleBuffer
from tests.federated_support import (
    add_samples,
    device_dir,
    drifted_shards,
    edge_model,
    flower_identity,
)


@pytest.fixture(autouse=True)
def _identity() -> None:
    flower_identity()


def _head() -> dict[str, np.ndarray]:
    graph = onnx.load_from_string(edge_model()).graph
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if i.name in ("head.weight", "head.bias")
    }


def _config(**overrides: object) -> ConfigRecord:
    values: dict[str, object] = {
        "model": "digits-edge", "versions": "[1, 2]", "weight-name": "head.weight",
        "bias-name": "head.bias", "embedding-output": "embedding", "layout": "in_out",
        "min-samples": 20, "epochs": 3, "learning-rate": 0.02, "batch-size": 32,
        "optimizer": "adam", "seed": 11, "server-round": 2,
    }  # fmt: skip
    return ConfigRecord(values | overrides)  # type: ignore[arg-type]


def _train_message(config: ConfigRecord | None = None) -> Message:
    head = ArrayRecord({k: Array(v) for k, v in _head().items()})
    return Message(
        RecordDict({"arrays": head, "config": config or _config()}), 7, MessageType.TRAIN
    )


def _context(data_dir: Path, device_id: str = "dev-1") -> Context:
    return Context(
        run_id=1, node_id=7, state=RecordDict(), run_config={},
        node_config={"data-dir": str(data_dir), "device-id": device_id},
    )  # fmt: skip


@pytest.fixture
def device(tmp_path: Path) -> Path:
    data_dir = device_dir(tmp_path, edge_model())
    x, y = drifted_shards(5, per_device=60)[0]
    add_samples(data_dir, x, y)
    return data_dir


def test_train_sends_back_the_head_trained_on_the_buffer(device: Path) -> None:
    """The reply's head is exactly train_head on the buffer's embeddings with the round's
    seed; the metrics say how many examples and the loss before and after."""
    reply = app(_train_message(), _context(device))
    assert not reply.has_error(), reply.error
    metrics = reply.content.metric_records["metrics"]
    assert metrics["num-examples"] == 60
    assert metrics["train-loss"] < metrics["loss-before"]
    assert metrics["samples-feedback"] == 60
    assert metrics["samples-cloud"] == 0

    samples = SampleBuffer.open_existing(device / "samples.db").load("digits-edge")
    plan = RoundPlan(
        model="digits-edge", weight_name="head.weight", bias_name="head.bias",
        embedding_output="embedding", versions=frozenset({1}), layout="in_out",
        min_samples=20, train=TrainConfig(),
    )  # fmt: skip
    head = _head()
    expected = train_head(
        head["head.weight"], head["head.bias"], embeddings(device, plan, samples),
        samples.labels,
        TrainConfig(epochs=3, learning_rate=0.02, seed=round_seed(11, "dev-1", 2)),
    )  # fmt: skip
    arrays = reply.content.array_records["arrays"]
    np.testing.assert_array_equal(arrays["head.weight"].numpy(), expected.weight)
    np.testing.assert_array_equal(arrays["head.bias"].numpy(), expected.bias)


def test_fedprox_mu_from_the_server_changes_the_update(device: Path) -> None:
    plain = app(_train_message(), _context(device)).content.array_records["arrays"]
    prox = app(_train_message(_config(**{"proximal-mu": 5.0})), _context(device))
    moved = prox.content.array_records["arrays"]["head.weight"].numpy()
    w0 = _head()["head.weight"]
    assert np.linalg.norm(moved - w0) < np.linalg.norm(plain["head.weight"].numpy() - w0)


def test_too_few_samples_is_a_refusal_with_the_reason(device: Path) -> None:
    reply = app(_train_message(_config(**{"min-samples": 61})), _context(device))
    assert reply.has_error()
    assert reply.error.code == REFUSED
    assert "60 usable samples" in (reply.error.reason or "")


def test_a_device_serving_another_backbone_refuses(device: Path) -> None:
    reply = app(_train_message(_config(versions="[5]")), _context(device))
    assert reply.has_error()
    assert "serves digits-edge:1" in (reply.error.reason or "")


def test_a_device_without_learning_refuses(tmp_path: Path) -> None:
    data_dir = device_dir(tmp_path, edge_model())
    (data_dir / "samples.db").unlink()
    reply = app(_train_message(), _context(data_dir))
    assert reply.has_error()
    assert "learning is off" in (reply.error.reason or "")


def test_a_malformed_round_config_is_refused_not_crashed(device: Path) -> None:
    reply = app(_train_message(_config(epochs=0)), _context(device))
    assert reply.has_error()
    assert "refused" in (reply.error.reason or "")
    reply = app(_train_message(_config(versions="not json")), _context(device))
    assert reply.has_error()
    assert "configuration" in (reply.error.reason or "")


def test_query_says_who_the_device_is(device: Path) -> None:
    query = Message(
        RecordDict({"config": ConfigRecord({"model": "digits-edge"})}), 7, MessageType.QUERY
    )
    reply = app(query, _context(device, "cam-3"))
    info = reply.content.config_records["device"]
    assert dict(info) == {"device-id": "cam-3", "version": 1, "samples": 60}
