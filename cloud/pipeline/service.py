"""Pipeline operations on the registry: quantize a version (size rule, gate, calibrate,
register)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cloud.context import CloudContext
from cloud.pipeline.calibrate import RoutingTarget, calibrate, routing_spec
from cloud.pipeline.compress.measure import compare_latency
from cloud.pipeline.datasets import EvalData, builtin
from cloud.pipeline.evaluate import make_session, run_model
from cloud.pipeline.gate import gate_classifier, gate_embedding
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.tables import ModelVersion
from shared.errors import Conflict, GateFailed, InvalidInput
from shared.messages import CloudModelRef, HealthCheckSpec, RoutingPolicy, RoutingSpec, TensorSpec

__all__ = [
    "Int8Candidate",
    "LargerThanParent",
    "ParentVersion",
    "QuantizeOptions",
    "calibrate_routing",
    "check_cloud_model",
    "load_parent",
    "load_version_bytes",
    "prepare_int8",
    "quantize_version",
    "register_int8",
]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QuantizeOptions:
    max_drop_pt: float = 0.5
    min_cosine: float = 0.99
    target: RoutingTarget = field(default_factory=lambda: RoutingTarget("gap", 0.8))
    policy: RoutingPolicy | None = None
    cloud_model: tuple[str, int] | None = None
    method: QuantMethod | None = None
    # Which outputs hold the class probabilities (edge and cloud model) and the embedding
    # the learned router may use; a model without them gets no routing spec / no embedding.
    probabilities_output: str = "probabilities"
    cloud_probabilities_output: str = "probabilities"
    embedding_output: str = "embedding"
    learned: bool = True
    second_opinion: bool = True
    # Ship a second opinion beside ``policy`` (not only where the calibration chooses one):
    # a new version of a model whose routing had one keeps it.
    second_opinion_beside: bool = False
    # An INT8 child larger than its parent defeats the point of shipping it to a device;
    # registering one anyway is a decision someone takes explicitly.
    allow_larger: bool = False


class LargerThanParent(GateFailed):
    """The INT8 candidate is larger than its FP32 parent (tiny graphs: QDQ overhead)."""

    def __init__(self, model: str, version: int, size: int, parent_size: int) -> None:
        self.size = size
        self.parent_size = parent_size
        self.ratio = size / parent_size
        super().__init__(
            f"the INT8 candidate of {model}:{version} is {self.ratio:.2f}x the size of its "
            f"FP32 parent ({size} vs {parent_size} bytes): quantization overhead outweighs "
            "the smaller weights; nothing registered (allow_larger registers it anyway)"
        )


@dataclass(frozen=True, slots=True)
class ParentVersion:
    model: str
    version: int
    task: str
    precision: str
    data: bytes
    inputs: list[TensorSpec]
    outputs: list[str]
    trainable: list[str]
    dataset: str | None


def load_version_bytes(context: CloudContext, model: str, version: int) -> bytes:
    with context.database.session() as s:
        sha = repository.get_version(s, model_name=model, version=version).artifact_sha256
    return context.artifacts.path(sha).read_bytes()


def load_parent(
    context: CloudContext, model: str, version: int, *, action: str = "quantize"
) -> ParentVersion:
    """An FP32 version and its bytes (Conflict for any other precision)."""
    with context.database.session() as s:
        row = repository.get_version(s, model_name=model, version=version)
        if row.precision != "fp32":
            raise Conflict(f"{model}:{version} is {row.precision}; {action} an fp32 version")
        return ParentVersion(
            model=model,
            version=version,
            task=row.model.task,
            precision=row.precision,
            data=context.artifacts.path(row.artifact_sha256).read_bytes(),
            inputs=[TensorSpec.model_validate(i) for i in row.inputs],
            outputs=[o["name"] for o in row.outputs],
            trainable=list(row.trainable),
            dataset=row.dataset,
        )


def check_cloud_model(
    context: CloudContext, cloud: tuple[str, int], *, output: str, inputs: list[str]
) -> None:
    """InvalidInput unless the registered ``cloud`` model gives ``output`` and takes the
    inputs named: routing compares its probabilities with the edge's on the same requests,
    and the edge router merges the cloud's answer under that name."""
    ref = f"{cloud[0]}:{cloud[1]}"
    with context.database.session() as s:
        row = repository.get_version(s, model_name=cloud[0], version=cloud[1])
        outputs = [o["name"] for o in row.outputs]
        takes = sorted(i["name"] for i in row.inputs)
    if output not in outputs:
        raise InvalidInput(
            f"cloud model {ref} has no output {output!r} (its outputs: {outputs}): routing "
            "needs the cloud's class probabilities under that name"
        )
    if takes != sorted(inputs):
        raise InvalidInput(
            f"cloud model {ref} takes inputs {takes}, this model {sorted(inputs)}: the cloud "
            "must answer the edge's own requests"
        )


def calibrate_routing(
    context: CloudContext,
    parent: ParentVersion,
    int8: bytes,
    data: EvalData,
    options: QuantizeOptions,
) -> tuple[dict[str, Any], RoutingSpec | None]:
    """The calibration report and routing spec of a child (``int8``: its bytes) of
    ``parent``; none when the model has no probabilities output or the data no labels."""
    probs_name = options.probabilities_output
    if probs_name not in parent.outputs or data.calib_labels is None:
        return {}, None
    session = make_session(int8)
    edge_probs = run_model(session, data.calib_inputs, output=probs_name)
    embedding = None
    if options.embedding_output in parent.outputs:
        embedding = run_model(session, data.calib_inputs, output=options.embedding_output)
    cloud_probs = None
    if options.cloud_model is not None:
        cloud_bytes = load_version_bytes(context, *options.cloud_model)
        cloud_probs = run_model(
            make_session(cloud_bytes), data.calib_inputs, output=options.cloud_probabilities_output
        )
    target = options.target
    if target.kind == "gap" and cloud_probs is None:
        raise InvalidInput("a gap target needs cloud_model (name:version) to compare against")
    found = calibrate(
        edge_probs,
        data.calib_labels,
        target=target,
        cloud_probs=cloud_probs,
        embedding=embedding,
        embedding_output=options.embedding_output,
        learned=options.learned,
        # The second opinion reads one input: a model with several has none.
        inputs=data.calib_inputs.get(parent.inputs[0].name) if len(parent.inputs) == 1 else None,
        input_name=parent.inputs[0].name,
        second_opinion=options.second_opinion,
    )
    result = dict(found.report)
    cloud_ref = None
    if options.cloud_model is not None:
        result["cloud_model"] = f"{options.cloud_model[0]}:{options.cloud_model[1]}"
        # Pinned: the thresholds were calibrated against exactly this version's answers.
        cloud_ref = CloudModelRef(name=options.cloud_model[0], version=options.cloud_model[1])
    shipped, spec = routing_spec(
        found,
        policy=options.policy,
        target=str(target),
        cloud_model=cloud_ref,
        probabilities_output=probs_name,
        second_opinion_beside=options.second_opinion and options.second_opinion_beside,
    )
    if shipped is not None:
        result["shipped"] = shipped
    return result, spec


@dataclass(frozen=True, slots=True)
class Int8Candidate:
    """An INT8 child that passed the gate and the size rule, calibrated, not registered yet."""

    data: bytes
    method: QuantMethod
    metrics: dict[str, Any]
    calibration: dict[str, Any]
    routing: RoutingSpec | None
    health: HealthCheckSpec
    warnings: list[str]


def prepare_int8(
    context: CloudContext, parent: ParentVersion, data: EvalData, options: QuantizeOptions
) -> Int8Candidate:
    """Quantize ``parent``, gate it, calibrate routing; writes nothing (raises
    :class:`GateFailed` when the candidate is refused)."""
    embedding = parent.task == "embedding"
    routed = not embedding and options.probabilities_output in parent.outputs
    if options.cloud_model is not None and routed:  # a 400 now, not a 500 after the work
        check_cloud_model(
            context, options.cloud_model,
            output=options.cloud_probabilities_output, inputs=[i.name for i in parent.inputs],
        )  # fmt: skip
    method = options.method or (QuantMethod.DYNAMIC if embedding else QuantMethod.STATIC)
    int8 = quantize(
        parent.data,
        method=method,
        calibration=data.quantization_inputs,
        trainable=parent.trainable,
    )
    warnings = _size_warnings(parent.model, parent.version, len(int8), len(parent.data), options)
    if embedding:
        scores = gate_embedding(
            parent.data,
            int8,
            data.test_inputs,
            output=parent.outputs[0],
            min_cosine=options.min_cosine,
        )
    else:
        if data.test_labels is None:
            raise InvalidInput("a classifier's evaluation data needs labels 'y'")
        scores = gate_classifier(
            parent.data, int8, data.test_inputs, data.test_labels, max_drop_pt=options.max_drop_pt
        )
    metrics: dict[str, Any] = {**scores, "size_ratio": round(len(int8) / len(parent.data), 4)}
    metrics["latency"] = compare_latency(int8, parent.data, data.test_inputs)
    if warnings:
        metrics["warnings"] = warnings
    calibration, routing = calibrate_routing(context, parent, int8, data, options)
    health = golden_examples(int8, data.test_inputs)
    return Int8Candidate(int8, method, metrics, calibration, routing, health, warnings)


def register_int8(
    session: Session,
    context: CloudContext,
    parent: ParentVersion,
    candidate: Int8Candidate,
    actor: str,
) -> ModelVersion:
    """Register ``candidate`` as the child of ``parent`` (in the caller's unit of work)."""
    return register_version(
        session,
        context.artifacts,
        model_name=parent.model,
        blocks=[candidate.data],
        max_bytes=len(candidate.data),
        precision="int8",
        actor=actor,
        parent_version=parent.version,
        metrics=candidate.metrics,
        calibration=candidate.calibration,
        routing=candidate.routing,
        trainable=parent.trainable,
        healthcheck=candidate.health,
        source=f"quantize:{candidate.method.value}",
        dataset=parent.dataset,
        warnings=candidate.warnings,
    )


def quantize_version(
    context: CloudContext,
    *,
    model: str,
    version: int,
    data: EvalData | None,
    options: QuantizeOptions,
    actor: str,
) -> int:
    """Quantize ``model:version``, gate it, calibrate routing, register it as a child version.

    Nothing is written unless the candidate passes the gate and is no larger than its
    parent (or ``options.allow_larger`` says to register it anyway, with a warning kept in
    the version's metrics and in the audit log).
    """
    parent = load_parent(context, model, version)
    if data is None:
        if parent.dataset is None:
            raise InvalidInput(
                f"{model}:{version} has no recorded dataset; upload evaluation data (.npz)"
            )
        data = builtin(parent.dataset)
    candidate = prepare_int8(context, parent, data, options)
    with context.database.session() as s:
        row = register_int8(s, context, parent, candidate, actor)
        s.flush()
        _LOGGER.info("registered %s:%s (int8, %s)", model, row.version, candidate.metrics)
        return row.version


def _size_warnings(
    model: str, version: int, size: int, parent_size: int, options: QuantizeOptions
) -> list[str]:
    if size <= parent_size:
        return []
    refusal = LargerThanParent(model, version, size, parent_size)
    if not options.allow_larger:
        raise refusal
    warning = (
        f"INT8 is {refusal.ratio:.2f}x the size of its FP32 parent ({size} vs "
        f"{parent_size} bytes); registered with allow_larger"
    )
    _LOGGER.warning("%s:%s: %s", model, version, warning)
    return [warning]
