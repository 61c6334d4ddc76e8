"""INT8 quantization keeps the parent's accuracy; a broken candidate is refused with numbers."""

from __future__ import annotations

import pytest

from cloud.pipeline.evaluate import accuracy, run_model
from cloud.pipeline.gate import gate_classifier, gate_embedding
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.reference.digits import build_edge, digits_splits
from shared.errors import GateFailed, InvalidInput


@pytest.mark.parametrize("name", ["digits-edge", "digits-edge-weak"])
def test_int8_stays_within_half_a_point_of_fp32(
    reference_onnx: dict[str, bytes], name: str
) -> None:
    splits = digits_splits(0)
    fp32 = reference_onnx[name]
    int8 = quantize(fp32, method=QuantMethod.STATIC, calibration={"input": splits.x_calib})
    metrics = gate_classifier(fp32, int8, {"input": splits.x_test}, splits.y_test)
    assert metrics["accuracy_drop_pt"] <= 0.5
    assert len(int8) < len(fp32) or name == "digits-edge-weak"  # tiny graphs carry QDQ overhead


@pytest.mark.parametrize("seed", [1, 2])
def test_int8_holds_on_other_seeds(seed: int) -> None:
    splits = digits_splits(seed)
    fp32 = build_edge(splits, seed)
    int8 = quantize(fp32, method=QuantMethod.STATIC, calibration={"input": splits.x_calib})
    assert (
        gate_classifier(fp32, int8, {"input": splits.x_test}, splits.y_test)["accuracy_drop_pt"]
        <= 0.5
    )


def test_a_broken_calibration_set_gives_a_candidate_the_gate_refuses(
    reference_onnx: dict[str, bytes],
) -> None:
    """Calibrating on near-black images squeezes the activation ranges: accuracy collapses."""
    splits = digits_splits(0)
    fp32 = reference_onnx["digits-edge"]
    broken = quantize(fp32, method=QuantMethod.STATIC, calibration={"input": splits.x_calib * 0.02})
    assert (
        accuracy(run_model(broken, {"input": splits.x_test}, output="probabilities"), splits.y_test)
        < 0.5
    )
    with pytest.raises(GateFailed) as caught:
        gate_classifier(fp32, broken, {"input": splits.x_test}, splits.y_test)
    message = str(caught.value)
    assert "FP32 9" in message
    assert "pt drop > 0.5 pt allowed" in message
    assert "360 held-out examples" in message


def test_static_quantization_needs_clean_calibration_data(reference_onnx: dict[str, bytes]) -> None:
    fp32 = reference_onnx["digits-edge"]
    with pytest.raises(InvalidInput, match="needs calibration"):
        quantize(fp32, method=QuantMethod.STATIC)
    splits = digits_splits(0)
    bad = splits.x_calib.copy()
    bad[0, 0] = float("nan")
    with pytest.raises(InvalidInput, match="NaN"):
        quantize(fp32, method=QuantMethod.STATIC, calibration={"input": bad})


def test_the_embedding_gate_compares_cosine_and_neighbours(
    reference_onnx: dict[str, bytes],
) -> None:
    """The edge model's embedding output stands in for a sentence encoder here."""
    splits = digits_splits(0)
    fp32 = reference_onnx["digits-edge"]
    int8 = quantize(fp32, method=QuantMethod.STATIC, calibration={"input": splits.x_calib})
    metrics = gate_embedding(
        fp32, int8, {"input": splits.x_test}, output="embedding", min_cosine=0.9
    )
    assert 0.9 <= metrics["cosine_mean"] <= 1.0
    with pytest.raises(GateFailed, match="mean cosine"):
        gate_embedding(fp32, int8, {"input": splits.x_test}, output="embedding", min_cosine=0.99999)
