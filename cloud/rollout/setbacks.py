"""The fenced writes for what the engine cannot carry out: a device that cannot be moved fails
on its own, and a rollout that cannot be decided is ended with the reason."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from cloud.registry import repository
from cloud.registry.tables import RolloutTarget
from cloud.rollout.store import _fenced  # the fence every engine write goes through
from cloud.rollout.strategy import RolloutState, TargetState

__all__ = ["fail_target", "halt"]

# Targets whose device was told to change (sent the new version, or to drop the model).
_TOOK_NEW = tuple(
    s.value
    for s in (TargetState.DEPLOYING, TargetState.ACTIVE, TargetState.REMOVED, TargetState.FAILED)
)


def fail_target(
    session: Session, *, rollout_id: int, token: int, device_id: str, reverting: bool, reason: str
) -> bool:
    """A device that cannot be moved (no higher rev can be signed for it, its desired state
    cannot be built) fails on its own, so the rest of the rollout goes on: FAILED when it was
    to get the version, REVERT_FAILED when it was to go back. False if it had moved on."""
    expect = RolloutState.ABORTING if reverting else RolloutState.IN_PROGRESS
    _fenced(session, rollout_id=rollout_id, token=token, expect=expect.value)
    sources = _TOOK_NEW if reverting else (TargetState.PENDING.value,)
    failed = TargetState.REVERT_FAILED if reverting else TargetState.FAILED
    result = session.execute(
        update(RolloutTarget)
        .where(
            RolloutTarget.rollout_id == rollout_id,
            RolloutTarget.device_id == device_id,
            RolloutTarget.state.in_(sources),
        )
        .values(state=failed.value, reason=reason)
    )
    return getattr(result, "rowcount", 0) == 1


def halt(session: Session, *, rollout_id: int, token: int, expect: str, reason: str) -> str:
    """End a rollout the engine cannot decide, with the reason: a running or paused one
    starts its abort; an aborting one is ABORTED as it stands (devices not reached SKIPPED,
    those not confirmed back REVERT_FAILED). Returns the new state."""
    rollout = _fenced(session, rollout_id=rollout_id, token=token, expect=expect)
    if expect != RolloutState.ABORTING.value:
        rollout.state, rollout.reason = RolloutState.ABORTING.value, reason
    else:
        here = RolloutTarget.rollout_id == rollout_id
        session.execute(
            update(RolloutTarget)
            .where(here, RolloutTarget.state == TargetState.PENDING.value)
            .values(state=TargetState.SKIPPED.value, reason="rollout aborted before its wave")
        )
        session.execute(
            update(RolloutTarget)
            .where(
                here,
                RolloutTarget.rev.is_not(None),
                RolloutTarget.state.in_((*_TOOK_NEW, TargetState.REVERTING.value)),
            )
            .values(state=TargetState.REVERT_FAILED.value, reason=reason)
        )
        rollout.state, rollout.reason = RolloutState.ABORTED.value, reason
        rollout.finished_at = datetime.now(UTC)
    repository.record_audit(
        session, actor="rollout-engine", action=f"rollout.{rollout.state.lower()}",
        subject=f"rollout:{rollout_id}", detail={"reason": reason},
    )  # fmt: skip
    return rollout.state
