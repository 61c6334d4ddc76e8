"""Federated runs in SQL: starting one (every check before a row exists), its state changes
as compare-and-set updates (so two API replicas never both act on a run), its rounds, and
what REST shows of it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.artifacts.store import ArtifactStore
from cloud.federated.head import find_head
from cloud.federated.plan import RoundReport
from cloud.federated.schemas import (
    ACTIVE_RUN_STATES,
    CANCELLABLE_RUN_STATES,
    RoundPublic,
    RunCreate,
    RunDetail,
    RunPublic,
    RunState,
)
from cloud.federated.settings import FederatedSettings
from cloud.registry import repository
from cloud.registry.tables import FederatedRound, FederatedRun, Model, ModelVersion
from shared.errors import Conflict, InvalidInput, NotFound

__all__ = [
    "EMBEDDING_OUTPUT",
    "backbone_family",
    "create_run",
    "detail",
    "get_run",
    "list_runs",
    "public",
    "record_rounds",
    "set_state",
]

EMBEDDING_OUTPUT = "embedding"
# Links between versions that change the head only (quantization keeps float heads): the
# embedding a device computes is the same along them.
_HEAD_ONLY = ("quantize:", "federated:")


def _root(row: ModelVersion, by_id: dict[int, ModelVersion]) -> int:
    while row.parent_id is not None and row.source.startswith(_HEAD_ONLY):
        row = by_id[row.parent_id]
    return row.id


def backbone_family(session: Session, base: ModelVersion) -> list[int]:
    """Version numbers that share ``base``'s backbone (its embedding): its quantized children,
    earlier and later federated heads, their children."""
    rows = repository.list_versions(session, model_name=base.model.name)
    by_id = {r.id: r for r in rows}
    root = _root(base, by_id)
    return sorted(r.version for r in rows if _root(r, by_id) == root)


def _base(session: Session, model: str, version: int | None) -> ModelVersion:
    if version is not None:
        row = repository.get_version(session, model_name=model, version=version)
        if row.precision != "fp32":
            raise InvalidInput(f"{model}:{version} is {row.precision}; a run starts from FP32")
        return row
    fp32 = [v for v in repository.list_versions(session, model_name=model) if v.precision == "fp32"]
    if not fp32:
        raise NotFound(f"{model} has no FP32 version to start a run from")
    return fp32[-1]


def create_run(
    session: Session,
    artifacts: ArtifactStore,
    *,
    request: RunCreate,
    defaults: FederatedSettings,
    actor: str,
) -> FederatedRun:
    """A PENDING run; refused before anything is written when it could not work."""
    model = repository.get_model(session, name=request.model)
    base = _base(session, request.model, request.base_version)
    if not base.trainable:
        raise InvalidInput(f"{request.model}:{base.version} lists no trainable tensors")
    if base.dataset is None:
        raise InvalidInput(
            f"{request.model}:{base.version} has no held-out data recorded: the result of a "
            "run could not be gated"
        )
    head = find_head(
        artifacts.path(base.artifact_sha256).read_bytes(), list(base.trainable), EMBEDDING_OUTPUT
    )
    devices = sorted(d.id for d in repository.list_devices(session, labels=request.selector))
    if len(devices) < request.min_clients:
        raise InvalidInput(
            f"{len(devices)} enrolled devices have the labels {request.selector}; the run "
            f"needs at least min_clients={request.min_clients}"
        )
    if request.gate.eval_dataset is not None:
        from cloud.federated.finalize import evaluation_data

        evaluation_data(request.gate.eval_dataset)  # an unknown name is refused now
    busy = session.scalar(
        select(FederatedRun.id).where(
            FederatedRun.model_id == model.id,
            FederatedRun.state.in_([s.value for s in ACTIVE_RUN_STATES]),
        )
    )
    if busy is not None:
        raise Conflict(f"federated run {busy} of {request.model} is still going on")
    config: dict[str, Any] = {
        **request.model_dump(mode="json"),
        "base_version": base.version,
        "devices": devices,
        "versions": backbone_family(session, base),
        "wait_for_clients_s": request.wait_for_clients_s or defaults.wait_for_clients_s,
        "round_timeout_s": request.round_timeout_s or defaults.round_timeout_s,
        "head": {
            "weight_name": head.weight_name,
            "bias_name": head.bias_name,
            "layout": head.layout,
            "classes": head.classes,
            "embedding_output": EMBEDDING_OUTPUT,
        },
    }
    run = FederatedRun(
        model_id=model.id,
        base_version_id=base.id,
        state=RunState.PENDING.value,
        config=config,
        metrics={},
        selector=dict(request.selector),
        created_by=actor,
    )
    session.add(run)
    session.flush()
    repository.record_audit(
        session,
        actor=actor,
        action="federated.create",
        subject=f"federated:{run.id}",
        detail={
            "model": request.model,
            "base_version": base.version,
            "devices": len(devices),
            "rounds": request.rounds,
        },
    )
    return run


def set_state(
    session: Session,
    run_id: int,
    *,
    expect: tuple[RunState, ...],
    to: RunState,
    **values: Any,
) -> bool:
    """Move the run to ``to`` if it is in one of ``expect``; False if it was not (another
    replica acted first, or an operator cancelled it)."""
    now = datetime.now(UTC)
    if to.finished:
        values.setdefault("finished_at", now)
    result = session.execute(
        update(FederatedRun)
        .where(FederatedRun.id == run_id, FederatedRun.state.in_([s.value for s in expect]))
        .values(state=to.value, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(result, "rowcount", 0) == 1)


def record_rounds(session: Session, run_id: int, reports: list[RoundReport]) -> int:
    """Store the rounds not stored yet; returns how many were new."""
    known = set(
        session.scalars(select(FederatedRound.round).where(FederatedRound.run_id == run_id))
    )
    new = [r for r in reports if r.round not in known]
    for report in new:
        session.add(FederatedRound(run_id=run_id, **report.model_dump()))
    return len(new)


def get_run(session: Session, run_id: int) -> FederatedRun:
    run = session.get(FederatedRun, run_id)
    if run is None:
        raise NotFound(f"unknown federated run {run_id}")
    return run


def list_runs(
    session: Session,
    *,
    model: str | None = None,
    state: RunState | None = None,
    limit: int = 50,
    offset: int = 0,
) -> list[FederatedRun]:
    query = select(FederatedRun).order_by(FederatedRun.id.desc()).limit(limit).offset(offset)
    if state is not None:
        query = query.where(FederatedRun.state == state.value)
    if model is not None:
        query = query.join(Model, Model.id == FederatedRun.model_id).where(Model.name == model)
    return list(session.scalars(query))


def _version_number(session: Session, version_id: int | None) -> int | None:
    if version_id is None:
        return None
    row = session.get(ModelVersion, version_id)
    return row.version if row is not None else None


def public(session: Session, run: FederatedRun) -> RunPublic:
    model = session.get(Model, run.model_id)
    # A round that ended the run short (too few updates) is reported, but was not done.
    details = session.scalars(
        select(FederatedRound.detail).where(FederatedRound.run_id == run.id)
    ).all()
    done = sum(1 for d in details if d.get("aggregated", True))
    base = _version_number(session, run.base_version_id)
    return RunPublic(
        id=run.id,
        model=model.name if model else "?",
        base_version=base or 0,
        state=RunState(run.state),
        reason=run.reason,
        rounds=int(run.config.get("rounds", 0)),
        rounds_done=int(done or 0),
        selector=run.selector,
        flower_run_id=run.flower_run_id,
        result_version=_version_number(session, run.result_version_id),
        result_int8_version=_version_number(session, run.result_int8_version_id),
        rollout_id=run.rollout_id,
        cancellable=RunState(run.state) in CANCELLABLE_RUN_STATES,
        created_by=run.created_by,
        created_at=run.created_at,
        submitted_at=run.submitted_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
    )


def detail(session: Session, run: FederatedRun) -> RunDetail:
    rounds = session.scalars(
        select(FederatedRound).where(FederatedRound.run_id == run.id).order_by(FederatedRound.round)
    ).all()
    return RunDetail(
        **public(session, run).model_dump(),
        config=run.config,
        metrics=run.metrics,
        round_metrics=[RoundPublic.model_validate(r) for r in rounds],
    )
