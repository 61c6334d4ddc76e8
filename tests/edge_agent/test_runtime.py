"""Runtime: inputs checked against the manifest, hot swap without dropping a request, and an
engine failure turned into InferenceFailed (HTTP 500) instead of onnxruntime's own errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.runtime import LoadedModel, Runtime
from shared.errors import InferenceFailed, NotFound, TensorError
from shared.messages import Manifest, TensorSpec
from tests.edge_agent.support import lookup_model, manifest_for, tiny_classifier


def _load(runtime: Runtime, tmp_path: Path, data: bytes, manifest: Manifest) -> LoadedModel:
    path = tmp_path / f"{manifest.model}-{manifest.version}.onnx"
    path.write_bytes(data)
    return runtime.load(manifest, path)


def _classifier(runtime: Runtime, tmp_path: Path, version: int, seed: int) -> LoadedModel:
    data = tiny_classifier(seed=seed)
    return _load(runtime, tmp_path, data, manifest_for(data, version=version))


def test_a_swap_serves_the_new_model_and_a_request_in_flight_keeps_the_old(
    tmp_path: Path,
) -> None:
    runtime = Runtime()
    with pytest.raises(NotFound, match="no model 'm'"):
        runtime.get("m")
    v1 = _classifier(runtime, tmp_path, 1, seed=1)
    assert runtime.swap(v1) is None
    in_flight = runtime.get("m")  # a request that started before the swap holds this
    v2 = _classifier(runtime, tmp_path, 2, seed=2)
    assert runtime.swap(v2) is v1
    assert runtime.get("m").version == 2
    feed = {"input": np.ones((2, 4), dtype=np.float32)}
    old, new = in_flight.run(feed), runtime.get("m").run(feed)
    assert in_flight.version == 1
    assert old["probabilities"].shape == new["probabilities"].shape == (2, 3)
    assert not np.allclose(old["probabilities"], new["probabilities"])
    assert set(runtime.models()) == {"m"}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input": np.ones((1, 5), np.float32)}, "has shape [1, 5], the model wants [-1, 4]"),
        ({"input": np.ones(4, np.float32)}, "has shape [4]"),
        ({"input": np.array([[1, 2, np.nan, 4]], np.float32)}, "NaN or infinite"),
        ({"input": np.array([["a", "b", "c", "d"]])}, "the model wants FP32"),
        ({"pixels": np.ones((1, 4), np.float32)}, "do not match the model's ['input']"),
        ({}, "do not match"),
    ],
    ids=["shape", "rank", "nan", "dtype", "unknown-name", "missing"],
)
def test_inputs_that_do_not_fit_the_manifest_are_refused(
    tmp_path: Path, inputs: dict[str, np.ndarray], message: str
) -> None:
    loaded = _classifier(Runtime(), tmp_path, 1, seed=1)
    with pytest.raises(TensorError) as refused:
        loaded.check_inputs(inputs)
    assert message in refused.value.message
    assert refused.value.status_code == 400


def test_numbers_of_another_numeric_type_are_converted(tmp_path: Path) -> None:
    loaded = _classifier(Runtime(), tmp_path, 1, seed=1)
    checked = loaded.check_inputs({"input": np.array([[1, 2, 3, 4]], dtype=np.int64)})
    assert checked["input"].dtype == np.float32
    assert loaded.run(checked)["probabilities"].shape == (1, 3)


def test_an_engine_error_is_an_inference_failed_with_the_engine_s_first_line(
    tmp_path: Path,
) -> None:
    """The lookup graph is valid; index 12 lies outside its 10-row table, which only
    onnxruntime notices, while running."""
    data = lookup_model()
    manifest = manifest_for(data, inputs=[TensorSpec(name="index", datatype="INT64", shape=[-1])])
    loaded = _load(Runtime(), tmp_path, data, manifest)
    good = loaded.run(loaded.check_inputs({"index": np.array([0, 9])}))
    assert good["probabilities"].shape == (2, 3)
    with pytest.raises(InferenceFailed) as failed:
        loaded.run(loaded.check_inputs({"index": np.array([12])}))
    assert failed.value.status_code == 500
    assert failed.value.message.startswith("m:1 failed: ")
    assert "\n" not in failed.value.message
    assert "Traceback" not in failed.value.message
    # The session is not broken by it.
    assert loaded.run({"index": np.array([3])})["probabilities"].shape == (1, 3)


def test_an_unload_refuses_new_requests_and_lets_one_in_flight_finish(tmp_path: Path) -> None:
    """The model leaves: a request that already holds it finishes on its session (its file
    deleted underneath, as the store's garbage collection does), a new one is a NotFound
    (404), and another model keeps serving."""
    runtime = Runtime()
    runtime.swap(_classifier(runtime, tmp_path, 1, seed=1))
    other_data = tiny_classifier(seed=5)
    runtime.swap(_load(runtime, tmp_path, other_data, manifest_for(other_data, model="other")))
    in_flight = runtime.get("m")
    (tmp_path / "m-1.onnx").unlink()
    assert runtime.unload("m") is in_flight
    assert runtime.unload("m") is None
    with pytest.raises(NotFound, match="no model 'm' is active on this device") as gone:
        runtime.get("m")
    assert gone.value.status_code == 404
    feed = {"input": np.ones((1, 4), dtype=np.float32)}
    assert in_flight.run(feed)["probabilities"].shape == (1, 3)
    assert set(runtime.models()) == {"other"}
