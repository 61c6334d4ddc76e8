"""Runtime: one onnxruntime session per model, swapped or unloaded without dropping a request.

A swap builds the new session completely, then replaces the reference in one assignment;
requests already running keep the session they started with. An unload takes the model out
the same way: running requests finish on their session, new ones get a 404.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from shared.errors import InferenceFailed, NotFound, TensorError
from shared.messages import Manifest, TensorSpec
from shared.tensors import dtype_of

__all__ = ["LoadedModel", "Runtime", "error_line", "load_session"]

Array = npt.NDArray[Any]


def error_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an error (onnxruntime's run to many), bounded: enough to act on,
    never a traceback."""
    lines = str(exc).strip().splitlines()
    first = lines[0] if lines else type(exc).__name__
    return first[:limit]


def load_session(path: Path, *, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: Manifest
    session: ort.InferenceSession
    output_names: list[str]

    @property
    def version(self) -> int:
        return self.manifest.version

    def check_inputs(self, inputs: dict[str, Array]) -> dict[str, Array]:
        """Shape, dtype and finiteness checked against the manifest; a clear error if not."""
        specs: dict[str, TensorSpec] = {s.name: s for s in self.manifest.inputs}
        unknown = sorted(set(inputs) - set(specs))
        missing = sorted(set(specs) - set(inputs))
        if unknown or missing:
            raise TensorError(f"inputs {sorted(inputs)} do not match the model's {sorted(specs)}")
        checked = {}
        for name, spec in specs.items():
            array = np.asarray(inputs[name])
            want = dtype_of(spec.datatype)
            if array.dtype != want:
                if array.dtype.kind in "biuf" and want.kind in "biuf":
                    array = array.astype(want)
                else:
                    raise TensorError(
                        f"input {name!r} is {array.dtype}, the model wants {spec.datatype}"
                    )
            if array.ndim != len(spec.shape) or any(
                d != -1 and d != got for d, got in zip(spec.shape, array.shape, strict=False)
            ):
                raise TensorError(
                    f"input {name!r} has shape {list(array.shape)}, the model wants {spec.shape}"
                )
            if spec.shape and spec.shape[0] == -1 and array.shape[0] == 0:
                # Nothing to answer, and routing scores of zero rows have no minimum.
                raise TensorError(f"input {name!r} is an empty batch: send at least one row")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise TensorError(f"input {name!r} has NaN or infinite values")
            checked[name] = array
        return checked

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        """Run the session; an engine failure becomes :class:`InferenceFailed` (HTTP 500)."""
        try:
            outputs = self.session.run(self.output_names, inputs)
        except Exception as exc:  # onnxruntime raises its own pybind11 hierarchy
            raise InferenceFailed(
                f"{self.manifest.model}:{self.version} failed: {error_line(exc)}"
            ) from exc
        return dict(zip(self.output_names, outputs, strict=True))


class Runtime:
    def __init__(self, *, threads: int = 1) -> None:
        self.threads = threads
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def load(self, manifest: Manifest, path: Path) -> LoadedModel:
        session = load_session(path, threads=self.threads)
        return LoadedModel(manifest, session, [o.name for o in session.get_outputs()])

    def swap(self, loaded: LoadedModel) -> LoadedModel | None:
        """Make ``loaded`` serve its model; returns the one it replaced."""
        with self._lock:
            old = self._models.get(loaded.manifest.model)
            self._models = {**self._models, loaded.manifest.model: loaded}
        return old

    def unload(self, model: str) -> LoadedModel | None:
        """Stop serving ``model``; returns what served it (None: nothing did)."""
        with self._lock:
            old = self._models.get(model)
            self._models = {k: v for k, v in self._models.items() if k != model}
        return old

    def get(self, model: str) -> LoadedModel:
        loaded = self._models.get(model)
        if loaded is None:
            raise NotFound(f"no model {model!r} is active on this device")
        return loaded

    def models(self) -> dict[str, LoadedModel]:
        return dict(self._models)
