"""Evaluation data for quantization: an uploaded .npz, or a built-in dataset by name.

An .npz holds one array per model input (named like the input; ``x`` is accepted for a
single-input model) and, for classifiers, ``y`` with integer labels. It is split in two,
seeded and stratified where labels allow: a calibration half and a held-out half.
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput, NotFound
from shared.messages import TensorSpec
from shared.tensors import dtype_of

__all__ = ["BUILTIN_DIGITS", "EvalData", "builtin", "from_npz"]

Array = npt.NDArray[Any]
BUILTIN_DIGITS = "builtin:digits"
MAX_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class EvalData:
    """Calibration half (quantization ranges, routing thresholds) and held-out half (gate)."""

    calib_inputs: dict[str, Array]
    calib_labels: Array | None
    test_inputs: dict[str, Array]
    test_labels: Array | None
    # More data for activation ranges where there is some (never the held-out half).
    range_inputs: dict[str, Array] | None = None

    @property
    def quantization_inputs(self) -> dict[str, Array]:
        return self.range_inputs if self.range_inputs is not None else self.calib_inputs


def builtin(name: str) -> EvalData:
    if name == BUILTIN_DIGITS:
        from cloud.pipeline.reference.digits import digits_splits

        s = digits_splits(0)
        ranges = {"input": np.concatenate([s.x_train, s.x_calib])}
        return EvalData({"input": s.x_calib}, s.y_calib, {"input": s.x_test}, s.y_test, ranges)
    raise NotFound(f"unknown built-in dataset {name!r}")


def _check_input(name: str, array: Array, spec: TensorSpec) -> Array:
    if array.dtype.kind not in "biuf":
        raise InvalidInput(f"dataset input {name!r} is not numeric ({array.dtype})")
    if len(spec.shape) != array.ndim or any(
        want not in (-1, got) for want, got in zip(spec.shape[1:], array.shape[1:], strict=False)
    ):
        raise InvalidInput(
            f"dataset input {name!r} has shape {list(array.shape)}, the model wants {spec.shape}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidInput(f"dataset input {name!r} has NaN or infinite values")
    converted: Array = array.astype(dtype_of(spec.datatype))
    return converted


def from_npz(data: bytes, inputs: list[TensorSpec], *, seed: int = 0) -> EvalData:
    try:
        archive = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidInput(f"dataset is not a readable .npz file: {exc}") from exc
    if len(inputs) == 1 and inputs[0].name not in arrays and "x" in arrays:
        arrays[inputs[0].name] = arrays.pop("x")
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise InvalidInput(f"dataset lacks arrays for model inputs {missing}; has {sorted(arrays)}")
    features = {s.name: _check_input(s.name, arrays[s.name], s) for s in inputs}
    rows = {len(v) for v in features.values()}
    labels = arrays.get("y")
    if labels is not None:
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise InvalidInput("dataset labels 'y' must be a 1-D integer array")
        rows.add(len(labels))
    if len(rows) != 1:
        raise InvalidInput(f"dataset arrays disagree on their number of rows: {sorted(rows)}")
    n = rows.pop()
    if not 4 <= n <= MAX_ROWS:
        raise InvalidInput(f"dataset needs 4 to {MAX_ROWS} rows, has {n}")
    order = np.random.default_rng(seed).permutation(n)
    calib, test = order[: n // 2], order[n // 2 :]
    return EvalData(
        {k: v[calib] for k, v in features.items()},
        labels[calib].astype(np.int64) if labels is not None else None,
        {k: v[test] for k, v in features.items()},
        labels[test].astype(np.int64) if labels is not None else None,
    )
