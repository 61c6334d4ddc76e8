"""What every compressed child goes through before it is registered: the accuracy (or
cosine) gate against its parent on held-out data, its size and latency beside the
parent's, routing calibration where it is an edge classifier, and one registration."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from cloud.context import CloudContext
from cloud.pipeline.compress.data import CompressData
from cloud.pipeline.compress.measure import apgr, compare_latency, size_metrics
from cloud.pipeline.evaluate import make_session, run_model
from cloud.pipeline.gate import gate_classifier, gate_embedding
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.register import register_version
from cloud.pipeline.service import (
    ParentVersion,
    QuantizeOptions,
    calibrate_routing,
    check_cloud_model,
    load_version_bytes,
)
from cloud.registry import repository
from shared.errors import InvalidInput, NotFound
from shared.messages import RoutingSpec
from shared.routing import spec_confidence

__all__ = [
    "Child",
    "check_cloud_model",
    "gate_child",
    "measure_child",
    "register_child",
    "routing_for",
]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class Child:
    """A candidate and what it is, before the gate."""

    data: bytes
    precision: str
    source: str  # short: the registry keeps 32 characters
    label: str  # how the gate's refusal names it, e.g. "structured-pruned (50%)"
    details: dict[str, Any]  # how it was made, kept in its metrics under "compression"


def gate_child(
    parent: ParentVersion,
    child: Child,
    data: CompressData,
    options: QuantizeOptions,
    *,
    parent_label: str = "parent",
    parent_output: str | None = None,
) -> dict[str, Any]:
    """The gate's figures; GateFailed (422) with them when the child loses too much."""
    held_out = data.eval
    if parent.task == "embedding":
        return gate_embedding(
            parent.data,
            child.data,
            held_out.test_inputs,
            output=parent.outputs[0],
            min_cosine=options.min_cosine,
            candidate_label=child.label,
        )
    if held_out.test_labels is None:
        raise InvalidInput("a classifier's evaluation data needs labels 'y'")
    return gate_classifier(
        parent.data,
        child.data,
        held_out.test_inputs,
        held_out.test_labels,
        output=options.probabilities_output,
        parent_output=parent_output,
        max_drop_pt=options.max_drop_pt,
        candidate_label=child.label,
        parent_label=parent_label,
    )


def measure_child(parent: bytes, child: bytes, data: CompressData) -> dict[str, Any]:
    return {
        **size_metrics(child, parent),
        "latency": compare_latency(child, parent, data.eval.test_inputs),
    }


def routing_for(
    context: CloudContext,
    student: ParentVersion,
    child: bytes,
    data: CompressData,
    options: QuantizeOptions,
) -> tuple[dict[str, Any], RoutingSpec | None, float | None]:
    """Calibrated routing for an edge classifier child, and its APGR against the named
    cloud model on the held-out split (None where no cloud model is named)."""
    calibration, routing = calibrate_routing(context, student, child, data.eval, options)
    held_out = data.eval
    cloud = routing.cloud_model if routing is not None else None
    if routing is None or cloud is None or held_out.test_labels is None:
        return calibration, routing, None
    if not isinstance(cloud.version, int):  # calibration pins a version; "latest" has none
        return calibration, routing, None
    session = make_session(child)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, held_out.test_inputs), strict=True))
    cloud_probs = run_model(
        load_version_bytes(context, cloud.name, cloud.version),
        held_out.test_inputs,
        output=options.cloud_probabilities_output,
    )
    area = apgr(
        outputs[routing.probabilities_output],
        cloud_probs,
        held_out.test_labels,
        spec_confidence(routing, outputs, held_out.test_inputs),
    )
    return calibration, routing, area


def register_child(
    context: CloudContext,
    *,
    model: str,
    parent_version: int | None,
    child: Child,
    metrics: dict[str, Any],
    calibration: dict[str, Any],
    routing: RoutingSpec | None,
    trainable: list[str],
    dataset: str | None,
    golden_inputs: dict[str, Array],
    actor: str,
    create_task: str | None = None,
) -> int:
    """Register ``child`` as the next version of ``model`` (created first, in the same
    transaction, when ``create_task`` is given and the model is new)."""
    health = golden_examples(child.data, golden_inputs)
    with context.database.session() as s:
        if create_task is not None:
            try:
                existing = repository.get_model(s, name=model)
            except NotFound:
                repository.create_model(
                    s, name=model, task=create_task, description=child.details.get("about", "")
                )
            else:
                if existing.task != create_task:
                    raise InvalidInput(
                        f"model {model!r} is a {existing.task} model; a student is a "
                        f"{create_task} model: name another"
                    )
        row = register_version(
            s,
            context.artifacts,
            model_name=model,
            blocks=[child.data],
            max_bytes=len(child.data),
            precision=child.precision,
            actor=actor,
            parent_version=parent_version,
            metrics={**metrics, "compression": child.details},
            calibration=calibration,
            routing=routing,
            trainable=trainable,
            healthcheck=health,
            source=child.source,
            dataset=dataset,
        )
        s.flush()
        _LOGGER.info("registered %s:%s (%s, %s)", model, row.version, child.source, metrics)
        return row.version
