"""One ONNX session on the best execution provider there is (TensorRT → CUDA → CPU, as
configured), run on host arrays; on CUDA through IOBinding."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort

__all__ = ["Engine", "open_engine", "select_providers", "serves_fp16", "usable_providers"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]

_CUDA = "CUDAExecutionProvider"
_TENSORRT = "TensorrtExecutionProvider"


def select_providers(wanted: Sequence[str], available: Sequence[str]) -> list[str]:
    """The wanted providers that onnxruntime has, in the wanted order; CPU as the last resort."""
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


def serves_fp16(wanted: Sequence[str], available: Sequence[str]) -> bool:
    """Whether sessions run on a GPU provider, where FP16 versions pay off."""
    return select_providers(wanted, available)[0] in (_CUDA, _TENSORRT)


def usable_providers(wanted: Sequence[str]) -> list[str]:
    """The providers a session on this machine actually gets, of those ``wanted``: one
    listed as available may still fall back (CUDA without its libraries does), so a tiny
    session is asked."""
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=options,
        providers=select_providers(wanted, ort.get_available_providers()),
    )
    return list(session.get_providers())


def _provider_options(provider: str, cache_dir: Path | None) -> dict[str, str]:
    if provider == _TENSORRT and cache_dir is not None:
        # Building a TensorRT engine takes minutes; keep it across restarts.
        cache_dir.mkdir(parents=True, exist_ok=True)
        return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir)}
    return {}


class Engine:
    """``run(inputs)`` → every output, as host arrays. Thread-safe (onnxruntime sessions are)."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.output_names = [o.name for o in session.get_outputs()]
        self.metadata: dict[str, str] = dict(session.get_modelmeta().custom_metadata_map)
        self.iobinding = self.providers[0] in (_CUDA, _TENSORRT)

    def run(self, inputs: dict[str, Array]) -> dict[str, Array]:
        if self.iobinding:
            return self._run_bound(inputs)
        values = self.session.run(self.output_names, inputs)
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}

    def _run_bound(self, inputs: dict[str, Array]) -> dict[str, Array]:
        # Outputs stay on the device until the whole graph ran, then come back in one copy
        # each; inputs go up once (no per-node host round trips).
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cuda")
        self.session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return {n: np.asarray(v) for n, v in zip(self.output_names, values, strict=True)}


def open_engine(
    path: Path,
    *,
    providers: Sequence[str],
    threads: int = 0,
    cache_dir: Path | None = None,
    spin: bool = False,
) -> Engine:
    """``spin``: let intra-op threads spin while they wait for work (onnxruntime's default).
    A server does not: they would take the cores its event loop and batcher need between
    batches (bench b3_spinning: about 2x the HTTP throughput with two sleeping threads)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    chosen = select_providers(providers, ort.get_available_providers())
    session = ort.InferenceSession(
        str(path),
        sess_options=options,
        providers=[(p, _provider_options(p, cache_dir)) for p in chosen],
    )
    engine = Engine(session)
    _LOGGER.debug("loaded %s on %s", path.name, engine.providers)
    return engine
