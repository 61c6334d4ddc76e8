"""Check a decoded request against the version's inputs and outputs before it is queued:
names, datatypes, shapes, one batch size for all inputs, finite floats."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import TensorError
from shared.messages import TensorSpec
from shared.tensors import datatype_of, dtype_of

__all__ = ["check_inputs", "check_outputs"]

Array = npt.NDArray[Any]


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join("N" if d < 0 else str(d) for d in shape) + "]"


def _check_one(spec: TensorSpec, array: Array) -> None:
    expected = dtype_of(spec.datatype)
    if array.dtype != expected:
        raise TensorError(
            f"input {spec.name!r}: datatype {datatype_of(array)}, the model takes {spec.datatype}"
        )
    if array.ndim != len(spec.shape) or any(
        want >= 0 and got != want for want, got in zip(spec.shape, array.shape, strict=True)
    ):
        raise TensorError(
            f"input {spec.name!r}: shape {list(array.shape)}, the model takes "
            f"{_shape_text(spec.shape)}"
        )
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise TensorError(f"input {spec.name!r}: NaN or infinity where the model takes numbers")


def check_inputs(
    specs: Sequence[TensorSpec], inputs: dict[str, Array]
) -> tuple[dict[str, Array], int]:
    """The inputs in the model's order and their batch size (rows along axis 0)."""
    known = {s.name for s in specs}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TensorError(f"unknown input {unknown[0]!r}; the model takes {sorted(known)}")
    missing = [s.name for s in specs if s.name not in inputs]
    if missing:
        raise TensorError(f"missing input {missing[0]!r}; the model takes {sorted(known)}")
    ordered: dict[str, Array] = {}
    rows: int | None = None
    for spec in specs:
        array = inputs[spec.name]
        _check_one(spec, array)
        if array.ndim == 0:
            raise TensorError(f"input {spec.name!r}: a scalar has no batch dimension")
        if rows is None:
            rows = int(array.shape[0])
        elif array.shape[0] != rows:
            raise TensorError(
                f"input {spec.name!r}: {array.shape[0]} rows, other inputs have {rows}"
            )
        ordered[spec.name] = array
    assert rows is not None
    if rows == 0:
        raise TensorError("an empty batch (0 rows): nothing to infer")
    return ordered, rows


def check_outputs(specs: Sequence[TensorSpec], requested: Sequence[str]) -> None:
    known = {s.name for s in specs}
    for name in requested:
        if name not in known:
            raise TensorError(f"unknown output {name!r}; the model has {sorted(known)}")
