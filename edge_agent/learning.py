"""What the agent learns from, and how it takes part in federated rounds: the sample buffer
(cloud answers to hard inputs, labels apps send on ``POST /v1/feedback``) and the SuperNode
supervisor. Off unless ``federated`` is set in the agent's settings.

The feedback body is a KServe v2 request (JSON tensors, or Triton's binary extension) with
the model's name and one label per row::

    {"model": "digits-edge", "labels": [3],
     "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [...]}]}

It is checked against the model the device serves (names, shapes, dtypes, finite values,
labels within its classes) before anything is stored; a bad one is a 4xx and stores nothing.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.config import AgentSettings
from edge_agent.federated.local import BUFFER_FILE
from edge_agent.federated.supervisor import (
    SupernodeConfig,
    SupernodeState,
    SupernodeSupervisor,
    write_node_config,
)
from edge_agent.router import Answer
from edge_agent.runtime import LoadedModel, Runtime
from edge_agent.samples import LabelSource, SampleBuffer
from edge_agent.telemetry import Meter
from shared.errors import Conflict, InvalidInput, TensorError
from shared.messages import LearningState
from shared.tensors import decode_request

__all__ = ["FEEDBACK_KEYS", "Learning", "supernode_command"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]
FEEDBACK_KEYS = frozenset({"model", "labels", "inputs", "id", "parameters"})


def supernode_command(configured: Path | None) -> list[str] | None:
    """The `flower-supernode` to run: the configured one, else this installation's."""
    if configured is not None:
        return [str(configured)]
    beside = Path(sys.executable).with_name("flower-supernode")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("flower-supernode")
    return [found] if found else None


def _classes(loaded: LoadedModel, output: str) -> int | None:
    for spec in loaded.manifest.outputs:
        if spec.name == output and spec.shape and spec.shape[-1] > 0:
            return spec.shape[-1]
    return None


def _probabilities_output(loaded: LoadedModel) -> str:
    routing = loaded.manifest.routing
    return routing.probabilities_output if routing is not None else "probabilities"


class Learning:
    def __init__(self, settings: AgentSettings, runtime: Runtime, meter: Meter) -> None:
        self.settings = settings
        self.runtime = runtime
        self.meter = meter
        root = settings.data_dir
        self.buffer = SampleBuffer(
            root / BUFFER_FILE,
            max_samples=settings.samples_max,
            max_bytes=settings.samples_max_bytes,
        )
        self.supervisor: SupernodeSupervisor | None = None
        self._missing: str | None = None
        if settings.federated_superlink is not None:
            self.supervisor = self._supervisor(settings)

    def _supervisor(self, settings: AgentSettings) -> SupernodeSupervisor | None:
        command = supernode_command(settings.federated_supernode)
        if command is None:
            self._missing = (
                "no flower-supernode found: install the edge-federated extra or set "
                "federated_supernode"
            )
            _LOGGER.error("federated learning: %s", self._missing)
            return None
        home = settings.data_dir / "flower"
        node_config = write_node_config(
            home / "node.toml", device_id=settings.device_id, data_dir=settings.data_dir
        )
        assert settings.federated_superlink is not None
        return SupernodeSupervisor(
            SupernodeConfig(
                command=command,
                superlink=settings.federated_superlink,
                node_config_file=node_config,
                home=home,
                log_path=settings.data_dir / "logs" / "supernode.log",
                root_certificates=settings.federated_root_certificates,
                insecure=settings.federated_insecure,
                private_key=settings.federated_node_key,
                runtime_port=settings.federated_runtime_port,
                connect_timeout_s=settings.federated_connect_timeout_s,
            )
        )

    def start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.start()

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        self.buffer.close()

    # -- what goes into the buffer -------------------------------------------------------

    def on_answer(self, model: str, inputs: dict[str, Array], answer: Answer) -> None:
        """Keep the rows the cloud answered, labelled with the cloud's top class. Never
        raises: learning must not cost an app its answer."""
        rows = [i for i, r in enumerate(answer.rows) if r.source == "cloud" and not r.degraded]
        if not rows:
            return
        try:
            loaded = self.runtime.get(model)
            if not loaded.manifest.trainable:
                return
            probabilities = answer.outputs.get(_probabilities_output(loaded))
            if probabilities is None:
                return
            index = np.asarray(rows)
            labels = probabilities[index].argmax(axis=-1).reshape(len(rows)).tolist()
            checked = loaded.check_inputs(inputs)
            result = self.buffer.add(
                model,
                loaded.version,
                {k: v[index] for k, v in checked.items()},
                labels,
                LabelSource.CLOUD,
            )
        except Exception:
            self.meter.count("samples_failed", len(rows))
            _LOGGER.exception("could not keep %d cloud-labelled rows of %s", len(rows), model)
            return
        self.meter.count("samples_cloud", result.added + result.relabelled)
        self.meter.count("samples_evicted", result.evicted)

    def feedback(self, body: bytes, header_length: int | None, max_rows: int) -> dict[str, Any]:
        """Store an app's labelled rows; every problem is an error before anything is kept."""
        header = _feedback_header(body, header_length)
        model = header.get("model")
        if not isinstance(model, str) or not model:
            raise InvalidInput("feedback needs 'model': the name of a model this device serves")
        loaded = self.runtime.get(model)
        if not loaded.manifest.trainable:
            raise Conflict(f"{model}:{loaded.version} has no trainable head: feedback is not kept")
        request = decode_request(body, header_length, max_rows=max_rows)
        checked = loaded.check_inputs(request.inputs)
        rows = len(next(iter(checked.values())))
        classes = _classes(loaded, _probabilities_output(loaded))
        labels = _labels(header.get("labels"), rows, classes)
        result = self.buffer.add(model, loaded.version, checked, labels, LabelSource.FEEDBACK)
        self.meter.count("samples_feedback", result.added + result.relabelled)
        self.meter.count("samples_evicted", result.evicted)
        return {
            "model": model,
            "version": loaded.version,
            "stored": result.added,
            "relabelled": result.relabelled,
            "evicted": result.evicted,
            "buffered": self.buffer.stats().samples,
        }

    # -- what telemetry says -------------------------------------------------------------

    def state(self) -> LearningState:
        stats = self.buffer.stats()
        if self.supervisor is not None:
            status = self.supervisor.status()
            supernode, restarts, reason = status.state.value, status.restarts, status.reason
        elif self._missing is not None:
            supernode, restarts, reason = SupernodeState.MISSING.value, 0, self._missing
        else:
            supernode, restarts, reason = "off", 0, None
        return LearningState(
            samples=stats.samples,
            capacity=stats.capacity,
            sample_bytes=stats.bytes,
            by_source=stats.by_source,
            supernode=supernode,
            supernode_restarts=restarts,
            supernode_reason=reason,
        )


def _feedback_header(body: bytes, header_length: int | None) -> dict[str, Any]:
    raw = body[:header_length] if header_length is not None else body
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise TensorError(f"feedback is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise TensorError("feedback must be a JSON object")
    unknown = sorted(set(header) - FEEDBACK_KEYS)
    if unknown:
        raise InvalidInput(f"unknown feedback fields {unknown}; known: {sorted(FEEDBACK_KEYS)}")
    return header


def _labels(raw: Any, rows: int, classes: int | None) -> list[int]:
    if not isinstance(raw, list) or len(raw) != rows:
        raise InvalidInput(f"'labels' must be a list of {rows} class indices, one per row")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in raw):
        raise InvalidInput("labels must be integers (class indices)")
    top = classes if classes is not None else 1 << 31
    if any(not 0 <= v < top for v in raw):
        raise InvalidInput(f"labels must be in 0..{top - 1}")
    return [int(v) for v in raw]
