"""The health check a staged model passes before it may serve: load it, check its IO
against the manifest, run the golden inputs, compare within tolerance, bound the latency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.runtime import LoadedModel, Runtime, error_line
from shared.errors import EdgeFleetError, InferenceFailed
from shared.messages import Manifest
from shared.tensors import dtype_of

__all__ = ["HealthCheckFailed", "health_check"]

Array = npt.NDArray[Any]


class HealthCheckFailed(EdgeFleetError):
    status_code = 422


def health_check(runtime: Runtime, manifest: Manifest, path: Path) -> LoadedModel:
    """The loaded model if it passes; :class:`HealthCheckFailed` with the reason if not.

    Whatever the manifest's golden examples hold (a name the model lacks, a wrong count of
    values), the answer is that error, never a ``KeyError`` or ``ValueError``."""
    try:
        loaded = runtime.load(manifest, path)
    except Exception as exc:  # onnxruntime raises its own hierarchy
        raise HealthCheckFailed(f"model does not load: {error_line(exc, 200)}") from exc
    session_inputs = {i.name for i in loaded.session.get_inputs()}
    declared = {s.name for s in manifest.inputs}
    if session_inputs != declared:
        raise HealthCheckFailed(
            f"graph inputs {sorted(session_inputs)} != manifest {sorted(declared)}"
        )
    missing_out = {s.name for s in manifest.outputs} - set(loaded.output_names)
    if missing_out:
        raise HealthCheckFailed(f"graph lacks outputs {sorted(missing_out)}")
    spec = manifest.healthcheck
    for number, example in enumerate(spec.golden):
        feed = _golden_feed(manifest, number, example.inputs)
        start = time.perf_counter()
        try:
            outputs = loaded.run(feed)
        except InferenceFailed as exc:
            raise HealthCheckFailed(f"golden input {number}: {exc.message}") from exc
        elapsed_ms = (time.perf_counter() - start) * 1000
        if elapsed_ms > spec.max_latency_ms:
            raise HealthCheckFailed(
                f"golden input {number} took {elapsed_ms:.1f} ms > {spec.max_latency_ms} ms"
            )
        for name, expected in example.outputs.items():
            if name not in outputs:
                raise HealthCheckFailed(
                    f"golden input {number} names output {name!r}, which the model lacks"
                )
            got = outputs[name].reshape(-1).astype(np.float64)
            want = np.asarray(expected, dtype=np.float64)
            if got.shape != want.shape:
                raise HealthCheckFailed(
                    f"golden input {number}: output {name!r} has the wrong size"
                )
            error = float(np.max(np.abs(got - want))) if got.size else 0.0
            if error > spec.atol:
                raise HealthCheckFailed(
                    f"golden input {number}: output {name!r} differs by {error:.3g} "
                    f"> atol {spec.atol}"
                )
    return loaded


def _golden_feed(
    manifest: Manifest, number: int, inputs: dict[str, list[float]]
) -> dict[str, Array]:
    shapes = {s.name: s for s in manifest.inputs}
    unknown = sorted(set(inputs) - set(shapes))
    missing = sorted(set(shapes) - set(inputs))
    if unknown or missing:
        raise HealthCheckFailed(
            f"golden input {number} names inputs {sorted(inputs)}, "
            f"the manifest declares {sorted(shapes)}"
        )
    feed = {}
    for name, values in inputs.items():
        tensor = shapes[name]
        # Golden inputs are one row, flattened; one dynamic dimension besides the batch.
        try:
            array = np.asarray(values, dtype=dtype_of(tensor.datatype))
            feed[name] = array.reshape([1] + [d if d > 0 else -1 for d in tensor.shape[1:]])
        except (ValueError, TypeError) as exc:
            raise HealthCheckFailed(
                f"golden input {number}: {len(values)} values for {name!r} do not fit "
                f"shape {tensor.shape} ({exc})"
            ) from exc
    return feed
