"""Build the reference models on demand (cached under the data dir) and register them."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cloud.context import CloudContext
from cloud.pipeline.calibrate import RoutingTarget
from cloud.pipeline.datasets import BUILTIN_DIGITS, builtin
from cloud.pipeline.evaluate import accuracy, make_session, run_model
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.reference import digits
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from cloud.pipeline.register import register_version
from cloud.pipeline.service import LargerThanParent, QuantizeOptions, quantize_version
from cloud.registry import repository
from shared.errors import NotFound

__all__ = ["REFERENCE_MODELS", "ReferenceModel", "register_reference"]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReferenceModel:
    name: str
    description: str
    task: str
    quantize: bool


_CLASSIFY = "classification"
REFERENCE_MODELS = {
    m.name: m
    for m in (
        ReferenceModel("digits-cloud", "RBF SVM on shifted 8x8 digits (cloud)", _CLASSIFY, False),
        ReferenceModel("digits-edge", "MLP 64-64-32 on 8x8 digits (edge)", _CLASSIFY, True),
        ReferenceModel("digits-edge-weak", "MLP on 4x4 pooled digits (weak edge)", _CLASSIFY, True),
        ReferenceModel("minilm", "all-MiniLM-L6-v2 sentence embeddings", "embedding", True),
    )
}


def _build(name: str, cache: Path) -> bytes:
    path = cache / f"{name}.onnx"
    if path.is_file():
        return path.read_bytes()
    if name == "minilm":
        from cloud.pipeline.reference.minilm import export_minilm

        data = export_minilm()
    else:
        splits = digits.digits_splits(0)
        builders: dict[str, Callable[[digits.DigitsSplits], bytes]] = {
            "digits-edge": digits.build_edge,
            "digits-edge-weak": digits.build_weak_edge,
            "digits-cloud": digits.build_cloud,
        }
        data = builders[name](splits)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return data


def _register_fp32(context: CloudContext, ref: ReferenceModel, data: bytes, actor: str) -> int:
    if ref.name == "minilm":
        from cloud.pipeline.reference.minilm import eval_data

        evaluation = eval_data()
        metrics: dict[str, float] = {}
        dataset = "builtin:minilm"
        trainable: list[str] = []
    else:
        evaluation = builtin(BUILTIN_DIGITS)
        assert evaluation.test_labels is not None
        probs = run_model(make_session(data), evaluation.test_inputs, output="probabilities")
        metrics = {"accuracy": round(accuracy(probs, evaluation.test_labels), 6)}
        dataset = BUILTIN_DIGITS
        trainable = [] if ref.name == "digits-cloud" else [HEAD_WEIGHT, HEAD_BIAS]
    with context.database.session() as s:
        try:
            repository.get_model(s, name=ref.name)
        except NotFound:
            repository.create_model(s, name=ref.name, description=ref.description, task=ref.task)
        row = register_version(
            s,
            context.artifacts,
            model_name=ref.name,
            blocks=[data],
            max_bytes=len(data),
            precision="fp32",
            actor=actor,
            metrics=metrics,
            trainable=trainable,
            healthcheck=golden_examples(data, evaluation.test_inputs),
            source="reference",
            dataset=dataset,
        )
        s.flush()
        return row.version


def _has_versions(context: CloudContext, name: str) -> bool:
    with context.database.session() as s:
        try:
            return bool(repository.list_versions(s, model_name=name))
        except NotFound:
            return False


def _latest(context: CloudContext, name: str) -> int:
    with context.database.session() as s:
        versions = repository.list_versions(s, model_name=name)
        fp32 = [v.version for v in versions if v.precision == "fp32"]
        if not fp32:
            raise NotFound(f"{name} has no fp32 version")
        return fp32[-1]


def register_reference(
    context: CloudContext,
    *,
    names: list[str],
    actor: str,
    progress: Callable[[str], None] = lambda _msg: None,
) -> list[tuple[str, int]]:
    """Build and register each named reference model (FP32, then INT8 where it applies
    and is smaller than its parent).

    Models that already have versions are left as they are; returns what was registered.
    """
    unknown = sorted(set(names) - set(REFERENCE_MODELS))
    if unknown:
        raise NotFound(f"unknown reference models {unknown}; known: {sorted(REFERENCE_MODELS)}")
    # The cloud model first: edge calibration measures the gap against it.
    ordered = sorted(names, key=lambda n: n != "digits-cloud")
    if any(n.startswith("digits-edge") for n in ordered) and "digits-cloud" not in ordered:
        ordered.insert(0, "digits-cloud")
    cache = context.settings.data_dir / "reference"
    registered: list[tuple[str, int]] = []
    # One builder at a time across every API replica: a Redis lock, not a thread lock.
    with context.redis.lock("edgefleet:lock:reference-build", timeout=1800, blocking_timeout=1800):
        for name in ordered:
            registered += _register_one(context, name, cache, actor, progress)
    return registered


def _register_one(
    context: CloudContext, name: str, cache: Path, actor: str, progress: Callable[[str], None]
) -> list[tuple[str, int]]:
    ref = REFERENCE_MODELS[name]
    if _has_versions(context, name):
        progress(f"{name}: already registered")
        return []
    progress(f"{name}: building")
    fp32 = _register_fp32(context, ref, _build(name, cache), actor)
    registered = [(name, fp32)]
    if ref.quantize:
        progress(f"{name}: quantizing, gating, calibrating")
        cloud = None
        if ref.task != "embedding":
            cloud = ("digits-cloud", _latest(context, "digits-cloud"))
        options = QuantizeOptions(
            target=RoutingTarget("gap", 0.8) if cloud else RoutingTarget("budget", 0.2),
            cloud_model=cloud,
        )
        data = None
        if name == "minilm":
            from cloud.pipeline.reference.minilm import eval_data

            data = eval_data()
        try:
            version = quantize_version(
                context, model=name, version=fp32, data=data, options=options, actor=actor
            )
        except LargerThanParent as exc:
            # The weak edge model is tiny: QDQ nodes outweigh its 8-bit weights. FP32 it is.
            progress(
                f"{name}: no INT8 version (it would be {exc.ratio:.2f}x the FP32 size, "
                f"{exc.size / 1024:.1f} vs {exc.parent_size / 1024:.1f} KiB); FP32 only"
            )
        else:
            registered.append((name, version))
    progress(f"{name}: done")
    return registered
