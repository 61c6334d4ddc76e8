"""Evaluation data for quantization: an uploaded .npz, or a built-in dataset by name.

An .npz holds one array per model input (named like the input; ``x`` is accepted for a
single-input model) and, for classifiers, ``y`` with integer labels. It is split in two,
seeded and stratified where labels allow: a calibration half and a held-out half.

An upload is read member by member, never with ``np.load``: the zip directory's declared
sizes and each ``.npy`` header's shape are checked against a cap before a byte is inflated
or an array allocated, and no read goes past what was declared (a lying archive fails its
size or CRC check instead of filling memory).
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput, NotFound, PayloadTooLarge
from shared.messages import TensorSpec
from shared.tensors import dtype_of

__all__ = ["BUILTIN_DIGITS", "MAX_INFLATED_BYTES", "EvalData", "builtin", "from_npz", "read_npz"]

Array = npt.NDArray[Any]
BUILTIN_DIGITS = "builtin:digits"
MAX_ROWS = 100_000
MAX_INFLATED_BYTES = 128 * 1024 * 1024
MAX_MEMBERS = 64
_MAX_HEADER_BYTES = 10_000  # numpy's own default for untrusted files
# What a damaged or hostile archive raises from zipfile, zlib, bz2/lzma and numpy's header
# reader; each is the uploader's fault, never the server's.
_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
               NotImplementedError)  # fmt: skip


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


def _read_npy(stream: IO[bytes], name: str, budget: int) -> Array:
    """One member: the header first, then exactly the bytes it declares if they fit."""
    fmt = np.lib.format
    version = fmt.read_magic(stream)
    width = {(1, 0): 2, (2, 0): 4}.get(version)
    if width is None:
        raise InvalidInput(f"dataset array {name!r} uses .npy format {version}; 1.0 or 2.0 only")
    # numpy reads a header whole before checking its length: check it first.
    length_field = stream.read(width)
    length = int.from_bytes(length_field, "little")
    if length > _MAX_HEADER_BYTES:
        raise InvalidInput(f"dataset array {name!r} has a {length} byte .npy header")
    header = io.BytesIO(length_field + stream.read(length))
    reader = fmt.read_array_header_1_0 if width == 2 else fmt.read_array_header_2_0
    shape, fortran, dtype = reader(header, max_header_size=_MAX_HEADER_BYTES)
    if dtype.hasobject:
        raise InvalidInput(f"dataset array {name!r} holds Python objects; numbers only")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"dataset array {name!r} declares a negative dimension {shape}")
    size = math.prod(shape) * dtype.itemsize
    if size > budget:
        raise PayloadTooLarge(
            f"dataset array {name!r} declares {size} bytes ({list(shape)} x {dtype}); only "
            f"{budget} are left of what a dataset may inflate to"
        )
    raw = stream.read(size)
    if len(raw) != size or stream.read(1):
        raise InvalidInput(f"dataset array {name!r} does not hold the {size} bytes it declares")
    array: Array = np.frombuffer(raw, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return array


def read_npz(data: bytes, *, max_bytes: int = MAX_INFLATED_BYTES) -> dict[str, Array]:
    """The arrays of an .npz, refused before inflating when the zip directory declares more
    than ``max_bytes`` in all, or a header an array larger than what is left of them."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            if len(members) > MAX_MEMBERS:
                raise InvalidInput(f"dataset has {len(members)} members; at most {MAX_MEMBERS}")
            declared = sum(m.file_size for m in members)
            if declared > max_bytes:
                raise PayloadTooLarge(
                    f"dataset inflates to {declared} bytes, over the limit of {max_bytes}"
                )
            arrays: dict[str, Array] = {}
            budget = max_bytes
            for member in members:
                key = member.filename.removesuffix(".npy")
                if key == member.filename or key in arrays:
                    raise InvalidInput(
                        f"dataset member {member.filename!r} is not one distinct .npy array"
                    )
                with archive.open(member) as stream:
                    arrays[key] = _read_npy(stream, member.filename, budget)
                budget -= arrays[key].nbytes
            return arrays
    except _UNREADABLE as exc:
        raise InvalidInput(f"dataset is not a readable .npz file: {str(exc)[:200]}") from exc


def from_npz(data: bytes, inputs: list[TensorSpec], *, seed: int = 0) -> EvalData:
    arrays = read_npz(data)
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
