"""The health check: a staged model serves only if it loads, matches its manifest's IO and
gives the golden outputs in time; every way of failing is a HealthCheckFailed with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.healthcheck import HealthCheckFailed, health_check
from edge_agent.runtime import Runtime
from shared.messages import GoldenExample, HealthCheckSpec, Manifest, TensorSpec
from tests.edge_agent.support import golden_for, lookup_model, manifest_for, tiny_classifier

ROW = [0.5, -1.0, 2.0, 0.25]
DATA = tiny_classifier(seed=4)


def _check(tmp_path: Path, manifest: Manifest, data: bytes = DATA) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    health_check(Runtime(), manifest, path)


def _failure(tmp_path: Path, manifest: Manifest, data: bytes = DATA) -> str:
    with pytest.raises(HealthCheckFailed) as failed:
        _check(tmp_path, manifest, data)
    assert failed.value.status_code == 422
    return failed.value.message


def test_a_model_that_gives_its_golden_outputs_passes(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(DATA)
    manifest = manifest_for(DATA, golden=[golden_for(DATA, {"input": ROW})])
    loaded = health_check(Runtime(), manifest, path)
    assert loaded.manifest is manifest
    assert loaded.output_names == ["probabilities"]


def test_golden_outputs_that_differ_beyond_the_tolerance_fail(tmp_path: Path) -> None:
    golden = GoldenExample(inputs={"input": ROW}, outputs={"probabilities": [1.0, 0.0, 0.0]})
    message = _failure(tmp_path, manifest_for(DATA, golden=[golden]))
    assert message.startswith("golden input 0: output 'probabilities' differs by")


def test_a_golden_output_of_the_wrong_size_fails(tmp_path: Path) -> None:
    golden = GoldenExample(inputs={"input": ROW}, outputs={"probabilities": [0.5, 0.5]})
    assert _failure(tmp_path, manifest_for(DATA, golden=[golden])) == (
        "golden input 0: output 'probabilities' has the wrong size"
    )


@pytest.mark.parametrize(
    ("golden", "message"),
    [
        (
            GoldenExample(inputs={"pixels": ROW}, outputs={}),
            "golden input 0 names inputs ['pixels'], the manifest declares ['input']",
        ),
        (
            GoldenExample(inputs={}, outputs={}),
            "golden input 0 names inputs [], the manifest declares ['input']",
        ),
        (
            GoldenExample(inputs={"input": [*ROW, 1.0]}, outputs={}),
            "golden input 0: 5 values for 'input' do not fit shape [-1, 4]",
        ),
        (
            GoldenExample(inputs={"input": ROW}, outputs={"logits": [0.0]}),
            "golden input 0 names output 'logits', which the model lacks",
        ),
    ],
    ids=["unknown-input", "no-input", "wrong-count", "unknown-output"],
)
def test_a_golden_example_the_model_cannot_take_is_a_health_check_failure(
    tmp_path: Path, golden: GoldenExample, message: str
) -> None:
    """These were a KeyError or a ValueError that escaped the deployer."""
    assert _failure(tmp_path, manifest_for(DATA, golden=[golden])).startswith(message)


def test_a_file_that_does_not_load_fails(tmp_path: Path) -> None:
    garbage = b"\x00not onnx" * 50
    message = _failure(tmp_path, manifest_for(garbage), garbage)
    assert message.startswith("model does not load: ")
    assert "\n" not in message


def test_a_graph_whose_io_differs_from_its_manifest_fails(tmp_path: Path) -> None:
    renamed = manifest_for(DATA, inputs=[TensorSpec(name="pixels", datatype="FP32", shape=[-1, 4])])
    assert _failure(tmp_path, renamed) == "graph inputs ['input'] != manifest ['pixels']"
    extra = manifest_for(
        DATA,
        outputs=[
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 3]),
            TensorSpec(name="embedding", datatype="FP32", shape=[-1, 8]),
        ],
    )
    assert _failure(tmp_path, extra) == "graph lacks outputs ['embedding']"


def test_an_engine_error_on_a_golden_input_fails(tmp_path: Path) -> None:
    data = lookup_model()
    manifest = manifest_for(
        data,
        inputs=[TensorSpec(name="index", datatype="INT64", shape=[-1])],
        golden=[GoldenExample(inputs={"index": [12]}, outputs={})],
    )
    assert _failure(tmp_path, manifest, data).startswith("golden input 0: m:1 failed: ")


def test_a_golden_input_slower_than_the_bound_fails(tmp_path: Path) -> None:
    """A bound of a nanosecond: no run of any model meets it."""
    manifest = manifest_for(DATA, golden=[golden_for(DATA, {"input": ROW})])
    slow = manifest.model_copy(
        update={
            "healthcheck": HealthCheckSpec(golden=manifest.healthcheck.golden, max_latency_ms=1e-6)
        }
    )
    message = _failure(tmp_path, slow)
    assert message.startswith("golden input 0 took ")
    assert message.endswith("> 1e-06 ms")
