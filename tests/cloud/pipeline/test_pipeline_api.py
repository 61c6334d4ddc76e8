"""The pipeline over REST and from the `edgefleet model` CLI, against a running API."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from cloud.pipeline.datasets import EvalData
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.service import QuantizeOptions, quantize_version
from shared.errors import GateFailed
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import ADMIN_TOKEN, RunningApi, seed_reference_cache

EDGEFLEET = shutil.which("edgefleet") or str(Path(sys.executable).parent / "edgefleet")


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture
def api_with_reference(api: RunningApi, reference_onnx: dict[str, bytes]) -> RunningApi:
    seed_reference_cache(api.context.settings, reference_onnx)
    return api


def test_reference_models_register_fp32_and_gated_calibrated_int8(
    api_with_reference: RunningApi,
) -> None:
    with api_with_reference.client() as c:
        r = c.post("/v1/reference-models", json={})
        assert r.status_code == 201, r.text
        added = {(v["model"], v["version"]): v for v in r.json()}
        # The weak edge model keeps FP32 only: its INT8 child would be larger than it.
        assert set(added) == {
            ("digits-cloud", 1), ("digits-edge", 1), ("digits-edge", 2), ("digits-edge-weak", 1),
        }  # fmt: skip
        int8 = added[("digits-edge", 2)]
        assert (int8["precision"], int8["parent_version"]) == ("int8", 1)
        assert int8["metrics"]["accuracy_drop_pt"] <= 0.5
        routing = int8["routing"]
        assert routing["policy"] in ("max_prob", "margin", "entropy", "learned")
        assert 0 < routing["threshold"] <= 1
        # The spec names who answers hard inputs and where the probabilities are, and
        # carries the curve a device follows under a budget.
        assert routing["cloud_model"] == {"name": "digits-cloud", "version": 1}
        assert routing["probabilities_output"] == "probabilities"
        assert [p["offload"] for p in routing["curve"]] == pytest.approx(
            [i / 20 for i in range(21)]
        )
        assert (routing["learned"] is not None) == (routing["policy"] == "learned")
        calibration = int8["calibration"]
        assert calibration["target"] == "gap:0.8"
        assert calibration["cloud_model"] == "digits-cloud:1"
        assert set(calibration["policies"]) == {
            "max_prob", "margin", "entropy", "learned", "second_opinion",
        }  # fmt: skip
        # A second opinion ships beside the best plain policy, never instead of it.
        second = calibration["shipped"] == "second_opinion"
        assert (routing["second_opinion"] is not None) == second
        assert routing["policy"] == (calibration["fallback"] if second else calibration["shipped"])
        assert int8["trainable"] == ["head.weight", "head.bias"]
        assert c.post("/v1/reference-models", json={}).json() == []
        assert c.post("/v1/reference-models", json={"models": ["nope"]}).status_code == 422


def test_quantize_over_rest_with_an_uploaded_dataset(api_with_reference: RunningApi) -> None:
    splits = digits_splits(0)
    data = _npz(x=splits.x_test, y=splits.y_test)
    with api_with_reference.client() as c:
        c.post("/v1/models", json={"name": "mine"})
        assert upload(c, "mine", api_with_reference.context.artifacts.root.parent.joinpath(
            "reference", "digits-edge.onnx").read_bytes()).status_code == 201  # fmt: skip
        r = c.post(
            "/v1/models/mine/versions/1/quantize",
            data={"options": '{"target": "budget:0.1", "policy": "margin"}'},
            files={"dataset": ("d.npz", data, "application/octet-stream")},
        )
        assert r.status_code == 201, r.text
        body = r.json()
        assert body["routing"]["policy"] == "margin"
        assert body["calibration"]["policies"]["margin"]["offload"] <= 0.1
        before = snapshot(api_with_reference.context)
        assert c.post("/v1/models/mine/versions/2/quantize").status_code == 409  # already int8
        assert c.post("/v1/models/mine/versions/1/quantize").status_code == 400  # no dataset
        assert c.post("/v1/models/mine/versions/9/quantize").status_code == 404
        bad = c.post(
            "/v1/models/mine/versions/1/quantize",
            files={"dataset": ("d.npz", b"not an npz", "application/octet-stream")},
        )
        assert bad.status_code == 400
        assert "npz" in bad.json()["error"]
        shape = c.post(
            "/v1/models/mine/versions/1/quantize",
            files={"dataset": ("d.npz", _npz(x=np.zeros((10, 5), np.float32)), "x/y")},
        )
        assert "shape" in shape.json()["error"]
        opts = c.post("/v1/models/mine/versions/1/quantize", data={"options": '{"target": "x"}'})
        assert opts.status_code == 400
        assert snapshot(api_with_reference.context) == before


def test_a_candidate_that_fails_the_gate_registers_nothing(api_with_reference: RunningApi) -> None:
    context = api_with_reference.context
    with api_with_reference.client() as c:
        c.post("/v1/reference-models", json={"models": ["digits-cloud"]})
        c.post("/v1/models", json={"name": "edge"})
        upload(
            c, "edge", (context.settings.data_dir / "reference" / "digits-edge.onnx").read_bytes()
        )
    before = snapshot(context)
    splits = digits_splits(0)
    broken = EvalData(
        {"input": splits.x_calib * 0.02}, splits.y_calib, {"input": splits.x_test}, splits.y_test
    )
    with pytest.raises(GateFailed, match=r"accuracy .* vs FP32 .* pt drop"):
        quantize_version(
            context, model="edge", version=1, data=broken, options=QuantizeOptions(), actor="t"
        )
    assert snapshot(context) == before


def _cli(api: RunningApi, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "250", "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [EDGEFLEET, "model", *args, "--api", api.url],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_the_model_cli_end_to_end(api_with_reference: RunningApi, tmp_path: Path) -> None:
    built = _cli(api_with_reference, "build-reference")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "digits-edge" in built.stdout
    assert "int8" in built.stdout
    model_file = api_with_reference.context.settings.data_dir / "reference" / "digits-edge.onnx"
    added = _cli(api_with_reference, "add", str(model_file), "--name", "my-edge")
    assert added.returncode == 0, added.stdout + added.stderr
    splits = digits_splits(0)
    data = tmp_path / "eval.npz"
    data.write_bytes(_npz(x=splits.x_test, y=splits.y_test))
    quant = _cli(
        api_with_reference, "quantize", "my-edge", "1", "--data", str(data),
        "--cloud-model", "digits-cloud:1",
    )  # fmt: skip
    assert quant.returncode == 0, quant.stdout + quant.stderr
    assert "int8" in quant.stdout
    listed = _cli(api_with_reference, "list")
    assert "my-edge" in listed.stdout
    assert "digits-edge-weak" in listed.stdout
    versions = _cli(api_with_reference, "list", "my-edge")
    assert "fp32" in versions.stdout
    assert "int8" in versions.stdout
    larger = _cli(
        api_with_reference, "quantize", "digits-edge-weak", "1",
        "--cloud-model", "digits-cloud:1",
    )  # fmt: skip
    assert larger.returncode == 1
    assert "error 422" in larger.stdout
    assert "allow_larger" in larger.stdout
    allowed = _cli(
        api_with_reference, "quantize", "digits-edge-weak", "1",
        "--cloud-model", "digits-cloud:1", "--allow-larger",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert "warning: digits-edge-weak:2: INT8 is" in allowed.stdout
    missing = _cli(api_with_reference, "quantize", "nope", "1")
    assert missing.returncode == 1
    assert "unknown model 'nope'" in missing.stdout


def _renamed_output(model: bytes, old: str, new: str) -> bytes:
    """``model`` with its output ``old`` called ``new`` (graph output and producing node)."""
    graph = onnx.load_from_string(model)
    for node in graph.graph.node:
        node.output[:] = [new if name == old else name for name in node.output]
    for output in graph.graph.output:
        if output.name == old:
            output.name = new
    return graph.SerializeToString()


def test_a_cloud_model_without_probabilities_is_a_clear_400_before_any_work(
    api_with_reference: RunningApi,
) -> None:
    """The cloud model named for routing gives its answers as 'scores', not 'probabilities':
    the quantize route says which output is missing (400), registers nothing, and never
    gets as far as running the model (it answered 500 from onnxruntime)."""
    context = api_with_reference.context
    reference = context.artifacts.root.parent / "reference"
    with api_with_reference.client() as c:
        assert c.post("/v1/reference-models", json={"models": ["digits-cloud"]}).status_code == 201
        c.post("/v1/models", json={"name": "edge"})
        c.post("/v1/models", json={"name": "scorer"})
        assert upload(c, "edge", (reference / "digits-edge.onnx").read_bytes()).status_code == 201
        scorer = _renamed_output(
            (reference / "digits-cloud.onnx").read_bytes(), "probabilities", "scores"
        )
        assert upload(c, "scorer", scorer).status_code == 201
        before = snapshot(context)
        splits = digits_splits(0)
        r = c.post(
            "/v1/models/edge/versions/1/quantize",
            data={"options": '{"cloud_model": "scorer:1"}'},
            files={"dataset": ("d.npz", _npz(x=splits.x_test, y=splits.y_test), "x/y")},
        )
        assert r.status_code == 400, r.text
        assert "scorer:1 has no output 'probabilities'" in r.json()["error"]
        assert snapshot(context) == before
