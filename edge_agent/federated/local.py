"""One device's part of a federated round, without Flower: read the agent's sample buffer,
compute embeddings with the model the device serves, and train the head on them.

The ClientApp (``client_app``) is a thin Flower wrapper around these functions; they never
write anything on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.federated.head import HeadUpdate, Layout, TrainConfig, train_head
from edge_agent.model_store import StoreState
from edge_agent.runtime import Runtime
from edge_agent.samples import SampleBuffer, Samples
from shared.errors import EdgeFleetError, InvalidInput

__all__ = [
    "BUFFER_FILE",
    "DeviceView",
    "Refused",
    "RoundPlan",
    "device_view",
    "embeddings",
    "local_update",
    "plan_from_config",
    "round_seed",
]

Array = npt.NDArray[Any]
BUFFER_FILE = "samples.db"


class Refused(EdgeFleetError):
    """This device does not take part in the round (too few samples, another backbone, …);
    the reason goes back to the server as the reply's error."""

    status_code = 409


@dataclass(frozen=True, slots=True)
class RoundPlan:
    """What the server asks of a device in one round."""

    model: str
    weight_name: str
    bias_name: str
    embedding_output: str
    # Versions of ``model`` whose embedding this head was trained on: a device serving
    # another version (another backbone) would send an update that means nothing.
    versions: frozenset[int]
    layout: Layout
    min_samples: int
    train: TrainConfig


@dataclass(frozen=True, slots=True)
class DeviceView:
    """What a device tells the server when asked who it is."""

    device_id: str
    version: int | None
    samples: int


def _buffer(data_dir: Path) -> SampleBuffer:
    return SampleBuffer.open_existing(data_dir / BUFFER_FILE)


def _active(data_dir: Path, model: str) -> tuple[Any, Path]:
    """The manifest and blob of ``model`` as the agent serves it (read-only)."""
    state_file = data_dir / "store" / "state.json"
    if not state_file.is_file():
        raise Refused(f"no model is installed on this device ({state_file} missing)")
    state = StoreState.from_bytes(state_file.read_bytes())
    installed = state.active.get(model)
    if installed is None:
        raise Refused(f"{model!r} is not active on this device")
    manifest = installed.manifest
    return manifest, data_dir / "store" / "blobs" / manifest.artifact.sha256


def device_view(data_dir: Path, device_id: str, model: str) -> DeviceView:
    try:
        version: int | None = _active(data_dir, model)[0].version
    except Refused:
        version = None
    buffer = _buffer(data_dir) if (data_dir / BUFFER_FILE).is_file() else None
    samples = 0
    if buffer is not None:
        try:
            samples = len(buffer.load(model))
        finally:
            buffer.close()
    return DeviceView(device_id, version, samples)


def round_seed(seed: int, device_id: str, server_round: int) -> int:
    """A seed per (run, device, round): devices shuffle differently, reruns the same."""
    digest = hashlib.blake2b(f"{seed}:{device_id}:{server_round}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def embeddings(data_dir: Path, plan: RoundPlan, samples: Samples) -> Array:
    """The embedding of every sample, by the model version the device serves."""
    manifest, blob = _active(data_dir, plan.model)
    if manifest.version not in plan.versions:
        raise Refused(
            f"this device serves {plan.model}:{manifest.version}, not one of the versions "
            f"this round's head belongs to ({sorted(plan.versions)})"
        )
    if plan.embedding_output not in {o.name for o in manifest.outputs}:
        raise Refused(f"{plan.model}:{manifest.version} has no output {plan.embedding_output!r}")
    loaded = Runtime(threads=1).load(manifest, blob)
    try:
        checked = loaded.check_inputs(samples.inputs)
    except EdgeFleetError as exc:
        raise Refused(f"stored samples do not fit {plan.model}: {exc.message}") from exc
    parts = []
    rows = len(samples)
    for start in range(0, rows, 256):
        feed = {k: v[start : start + 256] for k, v in checked.items()}
        parts.append(loaded.session.run([plan.embedding_output], feed)[0])
    result: Array = np.concatenate(parts).astype(np.float32)
    return result.reshape(rows, -1)


def local_update(
    data_dir: Path,
    device_id: str,
    plan: RoundPlan,
    weight: Array,
    bias: Array,
    server_round: int,
) -> tuple[HeadUpdate, dict[str, int]]:
    """Train the global head on this device's buffer; :class:`Refused` when it cannot."""
    if not (data_dir / BUFFER_FILE).is_file():
        raise Refused("learning is off on this device: it keeps no sample buffer")
    buffer = _buffer(data_dir)
    try:
        samples = buffer.load(plan.model)
    finally:
        buffer.close()
    classes = weight.shape[1] if plan.layout == "in_out" else weight.shape[0]
    usable = (samples.labels >= 0) & (samples.labels < classes)
    if len(samples) < plan.min_samples or int(usable.sum()) < plan.min_samples:
        raise Refused(
            f"{int(usable.sum())} usable samples of {plan.model} on this device; "
            f"a round needs at least {plan.min_samples}"
        )
    kept = Samples(
        {k: v[usable] for k, v in samples.inputs.items()},
        samples.labels[usable],
        [s for s, ok in zip(samples.sources, usable, strict=True) if ok],
        [v for v, ok in zip(samples.versions, usable, strict=True) if ok],
    )
    vectors = embeddings(data_dir, plan, kept)
    config = TrainConfig(
        epochs=plan.train.epochs,
        learning_rate=plan.train.learning_rate,
        batch_size=plan.train.batch_size,
        optimizer=plan.train.optimizer,
        proximal_mu=plan.train.proximal_mu,
        seed=round_seed(plan.train.seed, device_id, server_round),
    )
    try:
        update = train_head(weight, bias, vectors, kept.labels, config, layout=plan.layout)
    except InvalidInput as exc:
        raise Refused(f"cannot train on this device's samples: {exc.message}") from exc
    sources = {"samples-cloud": 0, "samples-feedback": 0}
    for source in kept.sources:
        key = f"samples-{source}"
        sources[key] = sources.get(key, 0) + 1
    return update, sources


def plan_from_config(config: dict[str, Any]) -> RoundPlan:
    """A round plan from the server's ConfigRecord; a malformed one is :class:`Refused`."""
    try:
        versions = frozenset(int(v) for v in json.loads(str(config["versions"])))
        layout = str(config.get("layout", "in_out"))
        if layout not in ("in_out", "out_in"):
            raise ValueError(f"layout {layout!r}")
        return RoundPlan(
            model=str(config["model"]),
            weight_name=str(config["weight-name"]),
            bias_name=str(config["bias-name"]),
            embedding_output=str(config["embedding-output"]),
            versions=versions,
            layout=layout,  # type: ignore[arg-type]
            min_samples=int(config["min-samples"]),
            train=TrainConfig(
                epochs=int(config["epochs"]),
                learning_rate=float(config["learning-rate"]),
                batch_size=int(config["batch-size"]),
                optimizer=str(config["optimizer"]),  # type: ignore[arg-type]
                proximal_mu=float(config.get("proximal-mu", 0.0)),
                seed=int(config["seed"]),
            ),
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise Refused(f"this round's configuration is not one this device reads: {exc}") from exc
    except InvalidInput as exc:
        raise Refused(f"this round's configuration is refused: {exc.message}") from exc
