"""The health check a staged model passes before it may serve: load it, check its IO
against the manifest, run the golden inputs, compare within tolerance, bound the latency."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edge_agent.runtime import LoadedModel, Runtime
from shared.errors import EdgeFleetError
from shared.messages import Manifest
from shared.tensors import dtype_of

__all__ = ["HealthCheckFailed", "health_check"]


class HealthCheckFailed(EdgeFleetError):
    status_code = 422


def health_check(runtime: Runtime, manifest: Manifest, path: Path) -> LoadedModel:
    try:
        loaded = runtime.load(manifest, path)
    except Exception as exc:  # onnxruntime raises its own hierarchy
        raise HealthCheckFailed(f"model does not load: {str(exc).splitlines()[0][:200]}") from exc
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
    shapes = {s.name: s for s in manifest.inputs}
    for number, example in enumerate(spec.golden):
        feed = {}
        for name, values in example.inputs.items():
            tensor = shapes[name]
            array = np.asarray(values, dtype=dtype_of(tensor.datatype))
            # Golden inputs are one row, flattened; one dynamic dimension besides the batch.
            feed[name] = array.reshape([1] + [d if d > 0 else -1 for d in tensor.shape[1:]])
        start = time.perf_counter()
        outputs = loaded.run(feed)
        elapsed_ms = (time.perf_counter() - start) * 1000
        if elapsed_ms > spec.max_latency_ms:
            raise HealthCheckFailed(
                f"golden input {number} took {elapsed_ms:.1f} ms > {spec.max_latency_ms} ms"
            )
        for name, expected in example.outputs.items():
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
