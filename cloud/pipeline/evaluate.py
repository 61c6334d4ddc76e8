"""Run an ONNX model over a dataset with onnxruntime (CPU), in batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["accuracy", "cosine_rows", "make_session", "run_model"]

Array = npt.NDArray[Any]


def make_session(model: Path | bytes, *, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_model(
    model: Path | bytes | ort.InferenceSession,
    inputs: dict[str, Array],
    *,
    output: str,
    batch_size: int = 256,
) -> Array:
    """``output`` for every row of ``inputs`` (all arrays share their first dimension)."""
    session = model if isinstance(model, ort.InferenceSession) else make_session(model)
    rows = len(next(iter(inputs.values())))
    parts = []
    for start in range(0, rows, batch_size):
        feed = {k: v[start : start + batch_size] for k, v in inputs.items()}
        parts.append(session.run([output], feed)[0])
    return np.concatenate(parts)


def accuracy(probabilities: Array, labels: Array) -> float:
    return float((probabilities.argmax(axis=1) == labels).mean())


def cosine_rows(a: Array, b: Array) -> Array:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    result: Array = (a * b).sum(axis=1)
    return result
