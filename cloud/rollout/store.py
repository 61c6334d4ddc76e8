"""Rollouts in SQL: creating one (targets, waves, superseding), operators' commands, and the
fenced writes through which the engine carries out its decisions. An undeploy is a rollout
without a version: each device's new rev leaves the model out of its desired state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from cloud.fleet.desired import (
    applied_revs,
    check_documents_fit,
    set_deployment,
    sign_next,
    signing_audit,
)
from cloud.registry import repository
from cloud.registry.tables import AuditEvent, Device, ModelVersion, Rollout, RolloutTarget
from cloud.rollout.progress import Decision
from cloud.rollout.reads import model_name
from cloud.rollout.strategy import RolloutState, Strategy, TargetState, plan_waves
from shared.errors import Conflict, EdgeFleetError, InvalidInput, NotFound

__all__ = [
    "ACTIVE_STATES",
    "Deposed",
    "StaleDecision",
    "apply_decision",
    "command",
    "create_rollout",
    "revert_target",
    "revert_targets",
    "start_target",
    "start_targets",
]

ACTIVE_STATES = (RolloutState.IN_PROGRESS, RolloutState.PAUSED, RolloutState.ABORTING)
# Targets an abort sends back: told to change, whatever they answered.
_TOOK_NEW = (TargetState.DEPLOYING, TargetState.ACTIVE, TargetState.REMOVED, TargetState.FAILED)
# What a newer rollout of the model takes over. Not ABORTING: its devices must finish going
# back first, or the newer rollout would record the bad version as what they ran before.
_SUPERSEDABLE = (RolloutState.IN_PROGRESS.value, RolloutState.PAUSED.value)
# Operator commands: the states each may start from, and where it leads.
_COMMANDS: dict[str, tuple[tuple[RolloutState, ...], RolloutState]] = {
    "pause": ((RolloutState.IN_PROGRESS,), RolloutState.PAUSED),
    "resume": ((RolloutState.PAUSED,), RolloutState.IN_PROGRESS),
    "abort": ((RolloutState.IN_PROGRESS, RolloutState.PAUSED), RolloutState.ABORTING),
}


class Deposed(EdgeFleetError):
    """Another engine holds a newer fencing token: this one must stop acting."""

    status_code = 409


class StaleDecision(Conflict):
    """The rollout changed since the engine decided (an operator paused or aborted it, a newer
    rollout superseded it): carry out nothing more of that decision; decide again."""


def create_rollout(
    session: Session,
    *,
    model: str,
    version: int | None,
    selector: dict[str, str],
    strategy: Strategy,
    actor: str = "admin",
) -> Rollout:
    """A rollout of ``model:version`` to every device whose labels include ``selector``,
    with its waves planned now (so any engine, at any time, carries out the same plan).
    ``version`` None undeploys ``model`` from those of them that should run it or say they
    do. Running and paused rollouts of the same model are superseded: their devices not
    reached yet are skipped, and the devices they already changed are this rollout's to take
    on. While one is ABORTING the new rollout is refused (409): its abort finishes first."""
    if version is None:
        model_id, version_id = repository.get_model(session, name=model).id, None
    else:
        row = repository.get_version(session, model_name=model, version=version)
        model_id, version_id = row.model_id, row.id
    device_ids = _selected(session, selector)
    if not device_ids:
        raise InvalidInput(f"no enrolled device has the labels {selector}")
    if version is None:
        device_ids = _running(session, device_ids, model)
        if not device_ids:
            raise InvalidInput(f"no device with the labels {selector} runs {model!r}")
    else:
        # A device whose document would not fit one broker message could never take it.
        check_documents_fit(session, device_ids=device_ids, version=row)
    older = _older(session, model=model, model_id=model_id)
    rollout = Rollout(
        model_id=model_id, model_version_id=version_id, selector=dict(selector),
        strategy=strategy.model_dump(mode="json"), state=RolloutState.IN_PROGRESS.value,
        created_by=actor,
    )  # fmt: skip
    session.add(rollout)
    session.flush()
    waves = plan_waves(rollout.id, device_ids, strategy)
    # previous_version_id is recorded when a device is moved (start_target), not now: a
    # manual deploy in between must be what an abort gives back.
    for device_id in device_ids:
        session.add(
            RolloutTarget(
                rollout_id=rollout.id,
                device_id=device_id,
                wave=waves[device_id],
                state=TargetState.PENDING.value,
            )
        )
    _supersede(session, older=older, by=rollout.id)
    repository.record_audit(
        session, actor=actor, action="rollout.create", subject=f"rollout:{rollout.id}",
        detail={"model": model, "version": version, "undeploy": version is None,
                "selector": selector, "devices": len(device_ids),
                "waves": max(waves.values()) + 1},
    )  # fmt: skip
    session.flush()
    return rollout


def _selected(session: Session, selector: dict[str, str]) -> list[str]:
    """Ids of the devices whose labels include every pair of ``selector``; only ids and
    labels are read (not the signed documents)."""
    rows = session.execute(select(Device.id, Device.labels).order_by(Device.id)).all()
    return [
        device_id
        for device_id, labels in rows
        if all((labels or {}).get(k) == v for k, v in selector.items())
    ]


def _running(session: Session, device_ids: list[str], model: str) -> list[str]:
    """Those of ``device_ids`` that should run ``model``, or say they run it (left over from
    a document that dropped it before agents unloaded what their documents no longer name)."""
    chosen = set(device_ids)
    rows = session.execute(select(Device.id, Device.desired, Device.reported).order_by(Device.id))
    return [
        device_id
        for device_id, desired, reported in rows.all()
        if device_id in chosen and _has_model(desired or {}, reported or {}, model)
    ]


def _has_model(desired: dict[str, object], reported: dict[str, object], model: str) -> bool:
    active = reported.get("active")
    return model in desired or (isinstance(active, dict) and model in active)


def _older(session: Session, *, model: str, model_id: int) -> list[int]:
    """The model's running and paused rollouts, locked (PostgreSQL) so that an engine write
    in flight commits first and is seen; Conflict while one is ABORTING."""
    rows = session.execute(
        select(Rollout.id, Rollout.state)
        .where(Rollout.model_id == model_id, Rollout.state.in_([s.value for s in ACTIVE_STATES]))
        .order_by(Rollout.id)
        .with_for_update()
    ).all()
    for rollout_id, state in rows:
        if state == RolloutState.ABORTING.value:
            raise Conflict(
                f"rollout {rollout_id} of {model} is ABORTING (its devices are going back to "
                "their previous version): start the new rollout once it is ABORTED"
            )
    return [rollout_id for rollout_id, _state in rows]


def _supersede(session: Session, *, older: list[int], by: int) -> None:
    if not older:
        return
    # Conditional: SQLite has no row locks, so an engine may have changed one since _older
    # read it; then the whole creation is refused rather than overwrite what it wrote.
    result = session.execute(
        update(Rollout)
        .where(Rollout.id.in_(older), Rollout.state.in_(_SUPERSEDABLE))
        .values(
            state=RolloutState.SUPERSEDED.value,
            superseded_by=by,
            reason=f"superseded by rollout {by}",
            finished_at=datetime.now(UTC),
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != len(older):
        raise Conflict(f"rollouts {older} changed while rollout {by} was created; try again")
    session.execute(
        update(RolloutTarget)
        .where(
            RolloutTarget.rollout_id.in_(older),
            RolloutTarget.state == TargetState.PENDING.value,
        )
        .values(state=TargetState.SKIPPED.value, reason=f"superseded by rollout {by}")
    )


def command(session: Session, *, rollout_id: int, action: str, actor: str) -> Rollout:
    """pause, resume or abort; refused (409) from a state it does not apply to.

    One conditional UPDATE, so a state the engine committed meanwhile is never overwritten
    (SQLite has no row locks; on PostgreSQL it waits for the engine's row lock)."""
    sources, target = _COMMANDS[action]
    values = {"state": target.value}
    if action == "abort":
        values["reason"] = f"aborted by {actor}"
    result = session.execute(
        update(Rollout)
        .where(Rollout.id == rollout_id, Rollout.state.in_([s.value for s in sources]))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    rollout = session.get(Rollout, rollout_id, populate_existing=True)
    if rollout is None:
        raise NotFound(f"unknown rollout {rollout_id}")
    if getattr(result, "rowcount", 0) != 1:
        raise Conflict(f"rollout {rollout_id} is {rollout.state}: cannot {action} it")
    repository.record_audit(
        session, actor=actor, action=f"rollout.{action}", subject=f"rollout:{rollout_id}"
    )
    session.flush()
    return rollout


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
        raise StaleDecision(f"rollout {rollout_id} changed while deciding")
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
    """``start_targets`` for one device: False if it was not PENDING."""
    return bool(start_targets(session, rollout_id=rollout_id, token=token,
                              device_ids=[device_id], key=key, lifetime=lifetime))  # fmt: skip


def start_targets(
    session: Session,
    *,
    rollout_id: int,
    token: int,
    device_ids: list[str],
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> list[str]:
    """Send a batch of devices the rollout's version (for an undeploy, a desired state without
    the model): for each, a new rev, signed, and its target DEPLOYING, all in this one
    transaction (a crash leaves all of them or none). Their targets, rows (locked) and applied
    revs are read in one query each. Returns the devices moved, in order (those still
    PENDING); a device that cannot be moved raises, and the caller rolls the batch back."""
    rollout = _fenced(
        session, rollout_id=rollout_id, token=token, expect=RolloutState.IN_PROGRESS.value
    )
    found = _targets(session, rollout_id, device_ids)
    moving = [d for d in device_ids if found[d].state == TargetState.PENDING.value]
    signer = _Signer(session, rollout=rollout, device_ids=moving, key=key, lifetime=lifetime)
    row = None
    if rollout.model_version_id is not None:
        row = session.get(ModelVersion, rollout.model_version_id)
        assert row is not None
    now = _now()
    for device_id in moving:
        target, device = found[device_id], signer.device(device_id)
        # What it runs now, read under its lock: what an abort sends it back to.
        entry = (device.desired or {}).get(signer.model) or {}
        target.previous_version_id = entry.get("version_id")
        rev = signer.drop(device) if row is None else signer.deploy(device, row)
        target.state, target.rev, target.started_at = TargetState.DEPLOYING.value, rev, now
    session.flush()
    return moving


def revert_target(
    session: Session,
    *,
    rollout_id: int,
    token: int,
    device_id: str,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> bool:
    """``revert_targets`` for one device: False if it had not taken the new version."""
    return bool(revert_targets(session, rollout_id=rollout_id, token=token,
                               device_ids=[device_id], key=key, lifetime=lifetime))  # fmt: skip


def revert_targets(
    session: Session,
    *,
    rollout_id: int,
    token: int,
    device_ids: list[str],
    key: Ed25519PrivateKey,
    lifetime: timedelta,
) -> list[str]:
    """Send a batch of devices back to the version each ran before this rollout (a new rev;
    after an undeploy, that puts the model back), or, for one that ran none, take the model
    out of its desired state (nothing to confirm then); in one transaction, as
    ``start_targets``. Returns the devices whose target changed, in order."""
    rollout = _fenced(
        session, rollout_id=rollout_id, token=token, expect=RolloutState.ABORTING.value
    )
    found = _targets(session, rollout_id, device_ids)
    moving = [d for d in device_ids if TargetState(found[d].state) in _TOOK_NEW]
    signer = _Signer(session, rollout=rollout, device_ids=moving, key=key, lifetime=lifetime)
    now = _now()
    for device_id in moving:
        target, device = found[device_id], signer.device(device_id)
        if target.previous_version_id is None:
            target.rev = signer.drop(device)
            target.state, target.reason = TargetState.REVERTED.value, "model taken off the device"
            continue
        previous = session.get(ModelVersion, target.previous_version_id)
        if previous is None:
            target.state, target.reason = TargetState.REVERT_FAILED.value, "previous version gone"
            continue
        target.rev = signer.deploy(device, previous)
        target.state, target.started_at = TargetState.REVERTING.value, now
        target.reason = f"sent back to version {previous.version}"
    session.flush()
    return moving


class _Signer:
    """Signs new revs for a batch of devices of one rollout: their rows locked in one query,
    their applied revs read in one, and the audit events added for the one flush at the
    end (no round trip per device)."""

    def __init__(
        self,
        session: Session,
        *,
        rollout: Rollout,
        device_ids: list[str],
        key: Ed25519PrivateKey,
        lifetime: timedelta,
    ) -> None:
        self.session, self.key, self.lifetime = session, key, lifetime
        self.rollout_id, self.actor = rollout.id, f"rollout:{rollout.id}"
        self.model = model_name(session, rollout)
        self.devices = repository.lock_devices(session, device_ids=device_ids)
        self.applied = applied_revs(session, list(self.devices.values()))

    def device(self, device_id: str) -> Device:
        device = self.devices.get(device_id)
        if device is None:
            raise NotFound(f"unknown device {device_id!r}")
        return device

    def deploy(self, device: Device, row: ModelVersion) -> int:
        """A new rev of the device's desired state running ``row`` of its model."""
        set_deployment(device=device, version=row, rollout_id=self.rollout_id)
        rev = self._sign(device)
        detail = {"model": row.model.name, "version": row.version, "rev": rev}
        self._audit("device.deploy", device.id, {**detail, "rollout_id": self.rollout_id})
        return rev

    def drop(self, device: Device) -> int:
        """A new rev of the device's desired state without the model (signed even if it had
        none: the device's answer to that rev is what confirms the model is gone)."""
        device.desired = {k: v for k, v in (device.desired or {}).items() if k != self.model}
        rev = self._sign(device)
        self._audit("device.undeploy", device.id,
                    {"model": self.model, "rev": rev, "rollout_id": self.rollout_id})  # fmt: skip
        return rev

    def _sign(self, device: Device) -> int:
        state = sign_next(self.session, device=device, key=self.key, lifetime=self.lifetime,
                          applied=self.applied.get(device.id, 0))  # fmt: skip
        self.session.add(AuditEvent(**signing_audit(state, actor=self.actor)))
        return state.rev

    def _audit(self, action: str, subject: str, detail: dict[str, object]) -> None:
        self.session.add(AuditEvent(actor=self.actor, action=action, subject=subject,
                                    detail=detail))  # fmt: skip


def _targets(session: Session, rollout_id: int, device_ids: list[str]) -> dict[str, RolloutTarget]:
    """The rollout's targets of ``device_ids``, in one query; NotFound if one is not."""
    rows = session.scalars(
        select(RolloutTarget).where(
            RolloutTarget.rollout_id == rollout_id, RolloutTarget.device_id.in_(device_ids)
        )
    ).all()
    found = {target.device_id: target for target in rows}
    for device_id in device_ids:
        if device_id not in found:
            raise NotFound(f"device {device_id!r} is not a target of rollout {rollout_id}")
    return found


def _now() -> datetime:
    return datetime.now(UTC)
