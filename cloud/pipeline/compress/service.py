"""Compression operations on the registry: prune a version (optionally fine-tuned and
quantized after) or convert it to FP16; each child gated against its FP32 parent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cloud.context import CloudContext
from cloud.pipeline.compress.children import (
    Child,
    check_cloud_model,
    gate_child,
    measure_child,
    register_child,
    routing_for,
)
from cloud.pipeline.compress.data import CompressData, compress_data
from cloud.pipeline.compress.fp16 import to_fp16
from cloud.pipeline.compress.mlp import Mlp, TrainOptions, train
from cloud.pipeline.compress.prune import Pruned, PruneMethod, magnitude_prune, structured_prune
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.service import ParentVersion, QuantizeOptions, load_parent
from cloud.registry import repository
from shared.errors import InvalidInput

__all__ = ["Fp16Options", "PruneOptions", "fp16_version", "prune_candidate", "prune_version"]


@dataclass(frozen=True, slots=True)
class PruneOptions:
    method: PruneMethod
    sparsity: float
    # Structured: a least-squares refit of the layers that read the removed neurons; then,
    # for edge MLPs (either method), a short training run distilled from the unpruned
    # parent, pruned weights held at zero.
    fine_tune: bool = False
    fine_tune_epochs: int = 30
    quantize: bool = False  # INT8 after pruning (static for classifiers, dynamic otherwise)
    gate: QuantizeOptions = field(default_factory=QuantizeOptions)

    def __post_init__(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise InvalidInput(f"sparsity must be in [0, 1), got {self.sparsity}")
        if not 1 <= self.fine_tune_epochs <= 1000:
            raise InvalidInput("fine_tune_epochs must be in [1, 1000]")


@dataclass(frozen=True, slots=True)
class Fp16Options:
    gate: QuantizeOptions = field(default_factory=QuantizeOptions)


def _is_mlp(model: bytes) -> bool:
    try:
        Mlp.from_onnx(model)
    except InvalidInput:
        return False
    return True


def _fine_tune(parent: ParentVersion, pruned: Pruned, data: CompressData, epochs: int) -> bytes:
    if data.train_labels is None:
        raise InvalidInput("fine-tuning a classifier needs labels 'y' in the dataset")
    name = parent.inputs[0].name
    x = data.train_inputs[name]
    teacher = run_model(parent.data, data.train_inputs, output="probabilities")
    tuned = train(
        Mlp.from_onnx(pruned.model),
        x,
        data.train_labels,
        teacher=teacher,
        options=TrainOptions(epochs=epochs, learning_rate=1e-3),
        masks=pruned.masks,
    )
    return tuned.to_onnx(parent.model.replace("-", "_"), input_name=name)


def prune_candidate(parent: ParentVersion, data: CompressData, options: PruneOptions) -> Child:
    """The pruned (fine-tuned, quantized) candidate of ``parent``, not yet gated."""
    mlp = _is_mlp(parent.data)
    details: dict[str, Any] = {"method": options.method.value, "sparsity": options.sparsity}
    if options.fine_tune and not mlp and options.method is PruneMethod.MAGNITUDE:
        raise InvalidInput(
            "fine-tuning after magnitude pruning needs the edge MLP layout; "
            "prune structured (refit by least squares) or without fine_tune"
        )
    if options.fine_tune and mlp:  # before any work: training indexes by the labels
        data.check_labels(Mlp.from_onnx(parent.data).head[0].shape[1])
    if options.method is PruneMethod.MAGNITUDE:
        pruned = magnitude_prune(parent.data, options.sparsity, keep=parent.trainable)
    else:
        pruned = structured_prune(
            parent.data,
            options.sparsity,
            data.train_inputs,
            keep=parent.trainable,
            repair=options.fine_tune,
        )
    details["pruning"] = pruned.report
    model = pruned.model
    if options.fine_tune:
        steps = []
        if options.method is PruneMethod.STRUCTURED:
            steps.append("least-squares refit of the layers reading pruned neurons")
        if mlp:
            model = _fine_tune(parent, pruned, data, options.fine_tune_epochs)
            steps.append(f"distilled from the parent, {options.fine_tune_epochs} epochs")
        details["fine_tune"] = "; ".join(steps)
    precision, source = "fp32", f"prune:{options.method.value}"
    if options.quantize:
        embedding = parent.task == "embedding"
        method = QuantMethod.DYNAMIC if embedding else QuantMethod.STATIC
        model = quantize(
            model,
            method=method,
            calibration=data.eval.quantization_inputs,
            trainable=parent.trainable,
        )
        precision, source = "int8", f"{source}+int8"
        details["quantized"] = method.value
    label = f"{options.method.value}-pruned ({options.sparsity:.0%})"
    if options.quantize:
        label += " INT8"
    return Child(model, precision, source, label, details)


def prune_version(
    context: CloudContext,
    *,
    model: str,
    version: int,
    upload: bytes | None,
    options: PruneOptions,
    actor: str,
) -> int:
    """Prune ``model:version`` (FP32), gate the child against it, register it as a child."""
    parent = load_parent(context, model, version, action="prune")
    gate = options.gate
    routed = parent.task != "embedding" and gate.probabilities_output in parent.outputs
    if gate.cloud_model is not None and routed:  # a 400 now, not a 500 after the work
        check_cloud_model(
            context, gate.cloud_model,
            output=gate.cloud_probabilities_output, inputs=[i.name for i in parent.inputs],
        )  # fmt: skip
    data = compress_data(upload=upload, dataset=parent.dataset, inputs=parent.inputs)
    child = prune_candidate(parent, data, options)
    return _finish(context, parent, child, data, options.gate, actor)


def fp16_version(
    context: CloudContext,
    *,
    model: str,
    version: int,
    upload: bytes | None,
    options: Fp16Options,
    actor: str,
) -> int:
    """Convert ``model:version`` (FP32) to FP16 (FP32 IO kept), gated against it. The gate
    runs here on the CPU, where onnxruntime computes FP16 nodes through casts; the serving
    side picks FP16 versions only where CUDA runs them."""
    parent = load_parent(context, model, version, action="convert to FP16")
    with context.database.session() as s:
        routed = repository.get_version(s, model_name=model, version=version).routing is not None
    if parent.trainable or routed:
        # Devices run edge models on their CPUs (and train the head there): FP16 only adds
        # casts there, and no rollout asks what a device's runtime can do.
        raise InvalidInput(
            f"FP16 is for cloud models served on a GPU; {model}:{version} is an edge model "
            "(a trainable head or routing) that devices run on their CPUs: quantize it to "
            "INT8 instead"
        )
    data = compress_data(upload=upload, dataset=parent.dataset, inputs=parent.inputs)
    child = Child(to_fp16(parent.data), "fp16", "fp16", "FP16", {"method": "fp16"})
    return _finish(context, parent, child, data, options.gate, actor, routed=False)


def _finish(
    context: CloudContext,
    parent: ParentVersion,
    child: Child,
    data: CompressData,
    gate: QuantizeOptions,
    actor: str,
    *,
    routed: bool = True,
) -> int:
    metrics: dict[str, Any] = gate_child(parent, child, data, gate, parent_label="FP32 parent")
    metrics.update(measure_child(parent.data, child.data, data))
    calibration: dict[str, Any] = {}
    routing = None
    if routed and parent.task != "embedding":
        calibration, routing, area = routing_for(context, parent, child.data, data, gate)
        if area is not None:
            metrics["apgr"] = area
    return register_child(
        context,
        model=parent.model,
        parent_version=parent.version,
        child=child,
        metrics=metrics,
        calibration=calibration,
        routing=routing,
        trainable=parent.trainable,
        dataset=data.name,
        golden_inputs=data.eval.test_inputs,
        actor=actor,
    )
