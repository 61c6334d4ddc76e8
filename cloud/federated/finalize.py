"""A finished run's head becomes a model version: written into the base's FP32 graph, gated
on the cloud's held-out data, quantized (and gated again), registered with its lineage, and,
if the run asked, rolled out as a canary through the rollout engine.

Every check runs before anything is written; then the FP32 version, its INT8 child, the
canary and the run's new state are one transaction. A candidate the gate refuses leaves
nothing behind but the run's reason.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from cloud.context import CloudContext
from cloud.federated.drift import drift_eval_data
from cloud.federated.head import replace_head
from cloud.federated.plan import RunFiles
from cloud.federated.schemas import GateOptions, RunState
from cloud.federated.store import backbone_family, get_run, set_state
from cloud.pipeline.calibrate import RoutingTarget
from cloud.pipeline.datasets import EvalData, builtin
from cloud.pipeline.evaluate import accuracy, make_session, run_model
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.register import register_version
from cloud.pipeline.service import (
    ParentVersion,
    QuantizeOptions,
    load_parent,
    prepare_int8,
    register_int8,
)
from cloud.registry import repository
from cloud.registry.tables import ModelVersion
from cloud.rollout.store import create_rollout
from cloud.rollout.strategy import Strategy
from shared.errors import EdgeFleetError, GateFailed, InvalidInput, NotFound
from shared.messages import RoutingPolicy

__all__ = ["evaluation_data", "finalize_run"]

_LOGGER = logging.getLogger(__name__)
_ACTOR = "federated"


def evaluation_data(name: str) -> EvalData:
    """A built-in evaluation set: the reference digits, or a drifted view of them."""
    return drift_eval_data(name) or builtin(name)


def _accuracy(model: bytes, data: EvalData) -> float:
    assert data.test_labels is not None
    return accuracy(
        run_model(make_session(model), data.test_inputs, output="probabilities"), data.test_labels
    )


def _gate(base: bytes, candidate: bytes, held_out: EvalData, gate: GateOptions) -> dict[str, Any]:
    """Accuracy of both on the base's held-out data (and the run's evaluation set): raise
    :class:`GateFailed` when the candidate loses too much, or gains too little where it
    should have adapted."""
    if held_out.test_labels is None:
        raise GateFailed("the base version's held-out data has no labels: nothing to gate on")
    base_acc, cand_acc = _accuracy(base, held_out), _accuracy(candidate, held_out)
    drop_pt = (base_acc - cand_acc) * 100
    scores: dict[str, Any] = {
        "accuracy": round(cand_acc, 6),
        "base_accuracy": round(base_acc, 6),
        "accuracy_drop_pt": round(drop_pt, 4),
        "gate_examples": len(held_out.test_labels),
    }
    problems = []
    if drop_pt > gate.max_drop_pt:
        problems.append(
            f"accuracy on the held-out data {cand_acc:.2%} vs the base's {base_acc:.2%} "
            f"({drop_pt:.2f} pt drop > {gate.max_drop_pt} pt allowed)"
        )
    if gate.eval_dataset is not None:
        shifted = evaluation_data(gate.eval_dataset)
        base_eval, cand_eval = _accuracy(base, shifted), _accuracy(candidate, shifted)
        gain_pt = (cand_eval - base_eval) * 100
        scores |= {
            "eval_dataset": gate.eval_dataset,
            "eval_accuracy": round(cand_eval, 6),
            "eval_base_accuracy": round(base_eval, 6),
            "eval_gain_pt": round(gain_pt, 4),
        }
        if gain_pt < gate.min_gain_pt:
            problems.append(
                f"accuracy on {gate.eval_dataset} {cand_eval:.2%} vs the base's {base_eval:.2%} "
                f"({gain_pt:.2f} pt gained < {gate.min_gain_pt} pt required)"
            )
    if problems:
        raise GateFailed("federated result refused: " + "; ".join(problems))
    return scores


def _quantize_options(
    context: CloudContext, base: ModelVersion, gate: GateOptions
) -> QuantizeOptions:
    """Route the new INT8 version as the base's INT8 children were routed (same target,
    policy, cloud model and, where it had one, a second opinion beside the policy, retrained
    on the new model), so a device's offload behaviour does not change under it."""
    with context.database.session() as s:
        family = set(backbone_family(s, base))
        rows = repository.list_versions(s, model_name=base.model.name)
        routed = [r for r in rows if r.version in family and r.precision == "int8" and r.routing]
    if not routed:
        return QuantizeOptions(
            max_drop_pt=gate.int8_max_drop_pt, target=RoutingTarget("budget", 0.2)
        )
    routing = routed[-1].routing or {}
    cloud = routing.get("cloud_model") or None
    cloud_model = None
    if cloud and isinstance(cloud.get("version"), int):
        cloud_model = (str(cloud["name"]), int(cloud["version"]))
    target = RoutingTarget.parse(str(routing.get("target") or "budget:0.2"))
    if target.kind == "gap" and cloud_model is None:
        target = RoutingTarget("budget", 0.2)
    return QuantizeOptions(
        max_drop_pt=gate.int8_max_drop_pt,
        target=target,
        cloud_model=cloud_model,
        policy=RoutingPolicy(routing["policy"]) if routing.get("policy") else None,
        second_opinion_beside=routing.get("second_opinion") is not None,
    )


def finalize_run(context: CloudContext, run_id: int, files: RunFiles) -> RunState:
    """Turn a FINALIZING run's result into versions; returns the state it ended in."""
    with context.database.session() as s:
        run = get_run(s, run_id)
        config = dict(run.config)
        base_row = s.get(ModelVersion, run.base_version_id)
        if base_row is None:
            raise NotFound(f"the base version of federated run {run_id} is gone")
        model, base_version = base_row.model.name, base_row.version
        selector = dict(run.selector)
    gate = GateOptions.model_validate(config.get("gate") or {})
    base = load_parent(context, model, base_version, action="federate")
    try:
        if base.dataset is None:
            raise GateFailed(f"{model}:{base_version} has no held-out data recorded to gate on")
        held_out = evaluation_data(base.dataset)
        candidate_bytes = replace_head(base.data, files.read_head("result"))
        scores = _gate(base.data, candidate_bytes, held_out, gate)
        candidate = dataclasses.replace(base, data=candidate_bytes, version=0)
        options = _quantize_options(context, base_row, gate)
        int8 = prepare_int8(context, candidate, held_out, options)
        if options.second_opinion_beside and (
            int8.routing is None or int8.routing.second_opinion is None
        ):
            _LOGGER.warning(
                "federated run %s: the base routed with a second opinion; none could be "
                "calibrated for the new model, which routes by its plain policy",
                run_id,
            )
    except (GateFailed, InvalidInput) as exc:
        _LOGGER.warning("federated run %s: %s", run_id, exc.message)
        with context.database.session() as s:
            set_state(
                s,
                run_id,
                expect=(RunState.FINALIZING,),
                to=RunState.GATE_FAILED,
                reason=exc.message[:2000],
                metrics={**run.metrics, "gate": {"refused": exc.message}},
            )
        return RunState.GATE_FAILED
    return _register(context, run_id, config, selector, candidate, scores, int8, held_out)


def _register(
    context: CloudContext,
    run_id: int,
    config: dict[str, Any],
    selector: dict[str, str],
    candidate: ParentVersion,
    scores: dict[str, Any],
    int8: Any,
    held_out: EvalData,
) -> RunState:
    metrics = {**scores, "federated_run": run_id, "rounds": config.get("rounds")}
    with context.database.session() as s:
        fp32 = register_version(
            s,
            context.artifacts,
            model_name=candidate.model,
            blocks=[candidate.data],
            max_bytes=len(candidate.data),
            precision="fp32",
            actor=_ACTOR,
            parent_version=config["base_version"],
            metrics=metrics,
            trainable=candidate.trainable,
            healthcheck=golden_examples(candidate.data, held_out.test_inputs),
            source=f"federated:run-{run_id}",
            dataset=candidate.dataset,
        )
        s.flush()
        child = register_int8(
            s, context, dataclasses.replace(candidate, version=fp32.version), int8, _ACTOR
        )
        s.flush()
        rollout_id, note = None, None
        if config.get("rollout"):
            try:
                with s.begin_nested():
                    rollout = create_rollout(
                        s,
                        model=candidate.model,
                        version=child.version,
                        selector=selector,
                        strategy=Strategy.model_validate(config["rollout"]),
                        actor=_ACTOR,
                    )
                rollout_id = rollout.id
            except EdgeFleetError as exc:
                note = f"registered, but no canary rollout: {exc.message}"
        run_metrics = {
            **get_run(s, run_id).metrics,
            "gate": scores,
            "int8": {k: v for k, v in int8.metrics.items() if k != "warnings"},
        }
        moved = set_state(
            s,
            run_id,
            expect=(RunState.FINALIZING,),
            to=RunState.COMPLETED,
            reason=note,
            result_version_id=fp32.id,
            result_int8_version_id=child.id,
            rollout_id=rollout_id,
            metrics=run_metrics,
        )
        if not moved:
            # Cancelled while the result was being checked: register nothing.
            s.rollback()
            return RunState.CANCELLED
        repository.record_audit(
            s,
            actor=_ACTOR,
            action="federated.register",
            subject=f"federated:{run_id}",
            detail={"fp32": fp32.version, "int8": child.version, "rollout": rollout_id},
        )
    _LOGGER.info(
        "federated run %s: registered %s:%s (int8 %s)%s",
        run_id,
        candidate.model,
        fp32.version,
        child.version,
        f", canary rollout {rollout_id}" if rollout_id else "",
    )
    return RunState.COMPLETED
