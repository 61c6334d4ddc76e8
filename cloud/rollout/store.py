"""Rollouts in SQL: creating one (targets, waves, superseding), operators' commands, and the
fenced writes through which the engine carries out its decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.fleet.desired import issue, set_deployment
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent, Model, ModelVersion, Rollout, RolloutTarget
from cloud.rollout.progress import Decision, Report, Target
from cloud.rollout.strategy import RolloutState, Strategy, TargetState, plan_waves
from shared.errors import Conflict, EdgeFleetError, InvalidInput, NotFound

__all__ = [
    "ACTIVE_STATES",
    "Deposed",
    "apply_decision",
    "command",
    "create_rollout",
    "load_targets",
    "reports_for",
    "revert_target",
    "start_target",
]

ACTIVE_STATES = (RolloutState.IN_PROGRESS, RolloutState.PAUSED, RolloutState.ABORTING)
# Operator commands: the states each may start from, and where it leads.
_COMMANDS: dict[str, tuple[tuple[RolloutState, ...], RolloutState]] = {
    "pause": ((RolloutState.IN_PROGRESS,), RolloutState.PAUSED),
    "resume": ((RolloutState.PAUSED,), RolloutState.IN_PROGRESS),
    "abort": ((RolloutState.IN_PROGRESS, RolloutState.PAUSED), RolloutState.ABORTING),
}


class Deposed(EdgeFleetError):
    """Another engine holds a newer fencing token: this one must stop acting."""

    status_code = 409


def create_rollout(
    session: Session,
    *,
    model: str,
    version: int,
    selector: dict[str, str],
    strategy: Strategy,
    actor: str = "admin",
) -> Rollout:
    """A rollout of ``model:version`` to every device whose labels include ``selector``,
    with its waves planned now (so any engine, at any time, carries out the same plan).
    Active rollouts of the same model are superseded: their devices not reached yet are
    skipped, and the devices they already changed are this rollout's to take on."""
    row = repository.get_version(session, model_name=model, version=version)
    devices = repository.list_devices(session, labels=selector)
    if not devices:
        raise InvalidInput(f"no enrolled device has the labels {selector}")
    rollout = Rollout(
        model_id=row.model_id, model_version_id=row.id, selector=dict(selector),
        strategy=strategy.model_dump(mode="json"), state=RolloutState.IN_PROGRESS.value,
        created_by=actor,
    )  # fmt: skip
    session.add(rollout)
    session.flush()
    waves = plan_waves(rollout.id, [d.id for d in devices], strategy)
    for device in devices:
        entry = (device.desired or {}).get(model) or {}
        session.add(
            RolloutTarget(
                rollout_id=rollout.id,
                device_id=device.id,
                wave=waves[device.id],
                state=TargetState.PENDING.value,
                previous_version_id=entry.get("version_id"),
            )
        )
    _supersede(session, model_id=row.model_id, by=rollout.id)
    repository.record_audit(
        session, actor=actor, action="rollout.create", subject=f"rollout:{rollout.id}",
        detail={"model": model, "version": version, "selector": selector,
                "devices": len(devices), "waves": max(waves.values()) + 1},
    )  # fmt: skip
    session.flush()
    return rollout


def _supersede(session: Session, *, model_id: int, by: int) -> None:
    older = session.scalars(
        select(Rollout).where(
            Rollout.model_id == model_id,
            Rollout.id != by,
            Rollout.state.in_([s.value for s in ACTIVE_STATES]),
        )
    ).all()
    now = datetime.now(UTC)
    for rollout in older:
        rollout.state = RolloutState.SUPERSEDED.value
        rollout.superseded_by = by
        rollout.reason = f"superseded by rollout {by}"
        rollout.finished_at = now
        session.execute(
            update(RolloutTarget)
            .where(
                RolloutTarget.rollout_id == rollout.id,
                RolloutTarget.state == TargetState.PENDING.value,
            )
            .values(state=TargetState.SKIPPED.value, reason=f"superseded by rollout {by}")
        )


def command(session: Session, *, rollout_id: int, action: str, actor: str) -> Rollout:
    """pause, resume or abort; refused (409) from a state it does not apply to."""
    sources, target = _COMMANDS[action]
    rollout = session.get(Rollout, rollout_id, with_for_update=True)
    if rollout is None:
        raise NotFound(f"unknown rollout {rollout_id}")
    if RolloutState(rollout.state) not in sources:
        raise Conflict(f"rollout {rollout_id} is {rollout.state}: cannot {action} it")
    rollout.state = target.value
    if action == "abort":
        rollout.reason = f"aborted by {actor}"
    repository.record_audit(
        session, actor=actor, action=f"rollout.{action}", subject=f"rollout:{rollout_id}"
    )
    session.flush()
    return rollout


# -- what the engine reads -------------------------------------------------------------


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


def reports_for(session: Session, rollout_id: int) -> list[Report]:
    """The ACTIVE and FAILED statuses devices sent for this rollout, oldest first."""
    rows = session.execute(
        select(
            DeploymentEvent.device_id,
            DeploymentEvent.rev,
            DeploymentEvent.version,
            DeploymentEvent.state,
            DeploymentEvent.reason,
        )
        .where(
            DeploymentEvent.rollout_id == rollout_id,
            DeploymentEvent.state.in_(("ACTIVE", "FAILED")),
        )
        .order_by(DeploymentEvent.id)
    ).all()
    return [Report(d, rev, v, state, reason) for d, rev, v, state, reason in rows]


# -- what the engine writes (each under the fence) -------------------------------------


def _fenced(session: Session, *, rollout_id: int, token: int, expect: str) -> Rollout:
    """Lock the rollout row, check no newer engine wrote it and that it is still in the
    state the decision was taken in (an operator may have paused it meanwhile)."""
    result = session.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.fence <= token)
        .values(fence=token)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        raise Deposed(f"rollout {rollout_id}: a newer engine holds it")
    rollout = session.get(Rollout, rollout_id, populate_existing=True)
    if rollout is None or rollout.state != expect:
        raise Conflict(f"rollout {rollout_id} changed while deciding")
    return rollout


def apply_decision(
    session: Session, *, rollout_id: int, token: int, expect: str, decision: Decision
) -> None:
    """Write the target changes and the rollout's next state and wave, in one transaction."""
    rollout = _fenced(session, rollout_id=rollout_id, token=token, expect=expect)
    now = datetime.now(UTC)
    for target in decision.targets.values():
        session.execute(
            update(RolloutTarget)
            .where(RolloutTarget.rollout_id == rollout_id,
                   RolloutTarget.device_id == target.device_id)
            .values(state=target.state.value, reason=target.reason)
        )  # fmt: skip
    if decision.wave != rollout.current_wave:
        rollout.current_wave = decision.wave
        rollout.wave_started_at = now
    if decision.state.value != rollout.state:
        rollout.state = decision.state.value
        if decision.reason is not None:
            rollout.reason = decision.reason
        if decision.state.finished:
            rollout.finished_at = now
        repository.record_audit(
            session, actor="rollout-engine", action=f"rollout.{decision.state.value.lower()}",
            subject=f"rollout:{rollout_id}", detail={"reason": decision.reason},
        )  # fmt: skip


def start_target(
    session: Session,
    *,
    rollout_id: int,
    token: int,
    device_id: str,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> bool:
    """Send one device the rollout's version: a new rev, signed, and the target DEPLOYING,
    in one transaction (a crash leaves both or neither). False if it was not PENDING."""
    rollout = _fenced(
        session, rollout_id=rollout_id, token=token, expect=RolloutState.IN_PROGRESS.value
    )
    target = _target(session, rollout_id, device_id)
    if target.state != TargetState.PENDING.value or rollout.model_version_id is None:
        return False
    row = session.get(ModelVersion, rollout.model_version_id)
    assert row is not None
    rev = _issue(session, device_id=device_id, row=row, rollout_id=rollout_id, key=key,
                 lifetime=lifetime)  # fmt: skip
    target.state, target.rev, target.started_at = TargetState.DEPLOYING.value, rev, _now()
    return True


def revert_target(
    session: Session,
    *,
    rollout_id: int,
    token: int,
    device_id: str,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> bool:
    """Send one device back to the version it ran before this rollout (a new rev), or, when
    it ran none, take the model out of its desired state (nothing to confirm then)."""
    rollout = _fenced(
        session, rollout_id=rollout_id, token=token, expect=RolloutState.ABORTING.value
    )
    target = _target(session, rollout_id, device_id)
    if target.state not in (s.value for s in (TargetState.DEPLOYING, TargetState.ACTIVE,
                                              TargetState.FAILED)):  # fmt: skip
        return False
    if target.previous_version_id is None:
        device = repository.lock_device(session, device_id=device_id)
        model = _model_name(session, rollout)
        desired = {k: v for k, v in (device.desired or {}).items() if k != model}
        device.desired = desired
        target.rev = issue(session, device=device, key=key, lifetime=lifetime,
                           actor=f"rollout:{rollout_id}").rev  # fmt: skip
        target.state, target.reason = TargetState.REVERTED.value, "model taken off the device"
        return True
    previous = session.get(ModelVersion, target.previous_version_id)
    if previous is None:
        target.state, target.reason = TargetState.REVERT_FAILED.value, "previous version gone"
        return True
    target.rev = _issue(session, device_id=device_id, row=previous, rollout_id=rollout_id,
                        key=key, lifetime=lifetime)  # fmt: skip
    target.state, target.started_at = TargetState.REVERTING.value, _now()
    target.reason = f"sent back to version {previous.version}"
    return True


def _issue(
    session: Session,
    *,
    device_id: str,
    row: ModelVersion,
    rollout_id: int,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> int:
    device = repository.lock_device(session, device_id=device_id)
    set_deployment(device=device, version=row, rollout_id=rollout_id)
    state = issue(session, device=device, key=key, lifetime=lifetime,
                  actor=f"rollout:{rollout_id}")  # fmt: skip
    repository.record_audit(
        session, actor=f"rollout:{rollout_id}", action="device.deploy", subject=device_id,
        detail={"model": row.model.name, "version": row.version, "rev": state.rev,
                "rollout_id": rollout_id},
    )  # fmt: skip
    return state.rev


def _target(session: Session, rollout_id: int, device_id: str) -> RolloutTarget:
    target = session.scalar(
        select(RolloutTarget).where(
            RolloutTarget.rollout_id == rollout_id, RolloutTarget.device_id == device_id
        )
    )
    if target is None:
        raise NotFound(f"device {device_id!r} is not a target of rollout {rollout_id}")
    return target


def _model_name(session: Session, rollout: Rollout) -> str:
    model = session.get(Model, rollout.model_id)
    assert model is not None
    return model.name


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; they were stored as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
