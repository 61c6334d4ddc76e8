"""INT8 quantization: static QDQ per-channel for classifiers, dynamic per-channel for
transformers (fused first where the exporter says how). Temporary files live in a private
directory that is always removed."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from cloud.pipeline.fusion import fuse_transformer
from shared.errors import InvalidInput

__all__ = ["QuantMethod", "quantize"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]


class QuantMethod(StrEnum):
    STATIC = "static"  # QDQ, per-channel weights, activations calibrated on data
    DYNAMIC = "dynamic"  # per-channel weights, activations quantized at run time


class _Batches(CalibrationDataReader):  # type: ignore[misc]
    def __init__(self, inputs: dict[str, Array], batch_size: int) -> None:
        rows = len(next(iter(inputs.values())))
        self._batches: Iterator[dict[str, Array]] = iter(
            [
                {k: v[i : i + batch_size] for k, v in inputs.items()}
                for i in range(0, rows, batch_size)
            ]
        )

    def get_next(self) -> dict[str, Array] | None:
        return next(self._batches, None)


def _preprocess(source: Path, target: Path, *, transformer: bool) -> Path:
    """Shape inference and graph optimisation before quantization, where it works."""
    try:
        # Symbolic shape inference fails on these transformer exports; skip it for them.
        quant_pre_process(str(source), str(target), skip_symbolic_shape=transformer)
        return target
    except Exception as exc:  # quant_pre_process raises bare Exceptions on odd graphs
        _LOGGER.warning("quant_pre_process skipped: %s", exc)
        return source


def _float_nodes(path: Path, trainable: frozenset[str]) -> list[str]:
    """Nodes that stay in float. Softmax: 8-bit probabilities (steps of 1/255) would tie the
    top classes and make routing thresholds coarse. Nodes that read a trainable tensor: the
    head stays a plain float initializer that federated learning reads and replaces.
    Unnamed nodes get names so they can be listed."""
    model = onnx.load(str(path))
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    onnx.save(model, str(path))
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "Softmax" or trainable.intersection(n.input)
    ]


def quantize(
    model: bytes,
    *,
    method: QuantMethod,
    calibration: dict[str, Array] | None = None,
    trainable: Sequence[str] = (),
    batch_size: int = 64,
    fuse: bool = True,
) -> bytes:
    """Return the INT8 model for ``model`` (FP32 ONNX bytes).

    Dynamic quantization of a transformer whose metadata names its architecture fuses
    attention and layer norm first (``fuse=False`` skips that, for comparison)."""
    if method is QuantMethod.STATIC:
        if not calibration:
            raise InvalidInput("static quantization needs calibration inputs")
        rows = {len(v) for v in calibration.values()}
        if len(rows) != 1 or 0 in rows:
            raise InvalidInput("calibration inputs must be non-empty and of one length")
        for name, value in calibration.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise InvalidInput(f"calibration input {name!r} has NaN or infinite values")
    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        work = Path(tmp)
        source = work / "fp32.onnx"
        source.write_bytes(model)
        if method is QuantMethod.DYNAMIC and fuse:
            fused = fuse_transformer(source, work / "fused.onnx")
            if fused is not None:
                _LOGGER.info("fused before quantizing: %s", fused)
                source = work / "fused.onnx"
        prepared = _preprocess(
            source, work / "prepared.onnx", transformer=method is QuantMethod.DYNAMIC
        )
        keep_float = _float_nodes(prepared, frozenset(trainable))
        target = work / "int8.onnx"
        if method is QuantMethod.STATIC:
            assert calibration is not None
            quantize_static(
                str(prepared),
                str(target),
                _Batches(calibration, batch_size),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                # 7-bit weights: u8s8 products saturate on x86 without VNNI (pmaddubsw).
                reduce_range=True,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=keep_float,
                extra_options={"QDQOpTypePerChannelSupportToAxis": {"MatMul": 1}},
            )
        else:
            quantize_dynamic(
                str(prepared),
                str(target),
                per_channel=True,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=keep_float,
                # Fused contrib ops (Attention, SkipLayerNorm) defeat type inference.
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        return target.read_bytes()
