"""What the rollout engine reads from SQL: a rollout's targets and what its devices said."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session

from cloud.registry.tables import (
    DeploymentEvent,
    Device,
    Model,
    ModelVersion,
    Rollout,
    RolloutTarget,
)
from cloud.rollout.progress import Report, Target
from cloud.rollout.strategy import TargetState

__all__ = ["load_targets", "model_name", "reports_for"]


def load_targets(session: Session, rollout: Rollout) -> list[Target]:
    rows = session.scalars(
        select(RolloutTarget).where(RolloutTarget.rollout_id == rollout.id)
    ).all()
    previous = {r.previous_version_id for r in rows if r.previous_version_id is not None}
    versions: dict[int, int] = {}
    if previous:
        query = select(ModelVersion.id, ModelVersion.version).where(ModelVersion.id.in_(previous))
        versions.update((i, v) for i, v in session.execute(query).all())
    return [
        Target(
            device_id=r.device_id,
            wave=r.wave,
            state=TargetState(r.state),
            rev=r.rev,
            started_at=_aware(r.started_at),
            previous_version=versions.get(r.previous_version_id)
            if r.previous_version_id is not None
            else None,
            reason=r.reason,
        )
        for r in rows
    ]


def reports_for(session: Session, rollout: Rollout) -> list[Report]:
    """The ACTIVE and FAILED statuses devices sent for this rollout at or above the rev each
    target waits on, in arrival order: of each distinct (device, rev, version, verdict) only
    the latest, so a device that repeats itself adds nothing and earlier revs are not read;
    for an undeploy, then, what its devices said of the model's removal."""
    rollout_id = rollout.id
    latest = (
        select(func.max(DeploymentEvent.id))
        .join(
            RolloutTarget,
            and_(
                RolloutTarget.rollout_id == DeploymentEvent.rollout_id,
                RolloutTarget.device_id == DeploymentEvent.device_id,
            ),
        )
        .where(
            DeploymentEvent.rollout_id == rollout_id,
            DeploymentEvent.state.in_(("ACTIVE", "FAILED")),
            RolloutTarget.rev.is_not(None),
            DeploymentEvent.rev >= RolloutTarget.rev,
        )
        .group_by(
            DeploymentEvent.device_id,
            DeploymentEvent.rev,
            DeploymentEvent.version,
            DeploymentEvent.state,
        )
    )
    rows = session.execute(
        select(
            DeploymentEvent.device_id,
            DeploymentEvent.rev,
            DeploymentEvent.version,
            DeploymentEvent.state,
            DeploymentEvent.reason,
        )
        .where(DeploymentEvent.id.in_(latest))
        .order_by(DeploymentEvent.id)
    ).all()
    reports = [Report(d, rev, v, state, reason) for d, rev, v, state, reason in rows]
    if rollout.model_version_id is None:
        reports += _removals(session, rollout)
    return reports


def _removals(session: Session, rollout: Rollout) -> list[Report]:
    """For the devices an undeploy waits on: their REMOVED (or removal FAILED) statuses at or
    after the rev that dropped the model, then their reported state where a rev at least as
    high no longer lists it. Both come from the agent only once nothing serves the model, and
    the reported state is sent again on every reconnect, so a crash between unloading and
    reporting still confirms. Statuses of a removal carry no rollout id (the document has
    none for a model it leaves out): the rev ties them to this rollout."""
    model = model_name(session, rollout)
    waiting = (
        RolloutTarget.rollout_id == rollout.id,
        RolloutTarget.state == TargetState.DEPLOYING.value,
        RolloutTarget.rev.is_not(None),
    )
    events = session.execute(
        select(
            DeploymentEvent.device_id,
            DeploymentEvent.rev,
            DeploymentEvent.version,
            DeploymentEvent.state,
            DeploymentEvent.reason,
        )
        .join(RolloutTarget, RolloutTarget.device_id == DeploymentEvent.device_id)
        .where(
            *waiting,
            DeploymentEvent.model == model,
            DeploymentEvent.rollout_id.is_(None),
            DeploymentEvent.state.in_(("REMOVED", "FAILED")),
            DeploymentEvent.rev >= RolloutTarget.rev,
        )
        .order_by(DeploymentEvent.id)
    ).all()
    reports = [Report(d, rev, v, state, reason) for d, rev, v, state, reason in events]
    reported = session.execute(
        select(Device.id, Device.reported)
        .join(RolloutTarget, RolloutTarget.device_id == Device.id)
        .where(*waiting)
        .order_by(Device.id)
    ).all()
    for device_id, state in reported:
        applied, active = (state or {}).get("rev_applied"), (state or {}).get("active")
        if isinstance(applied, int) and isinstance(active, dict) and model not in active:
            reports.append(Report(device_id, applied, None, "REMOVED", "reported without it"))
    return reports


def model_name(session: Session, rollout: Rollout) -> str:
    model = session.get(Model, rollout.model_id)
    assert model is not None
    return model.name


def _aware(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they were stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
