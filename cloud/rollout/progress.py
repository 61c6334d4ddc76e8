"""The rollout state machine as a pure function: from the rollout, its targets and what the
devices reported, the next decisions. No I/O here, so every rule is tested on its own and
two engines given the same rows decide the same.

An undeploy (``version`` None) is the same machine with another goal: a device is done when
it confirms the model is gone (REMOVED), as a deploy's is when it reports ACTIVE; an abort
sends every device that dropped (or was told to drop) the model its previous version back."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from cloud.rollout.strategy import RolloutState, Strategy, TargetState

__all__ = ["Decision", "Report", "Target", "step"]

_TOOK_NEW = (TargetState.DEPLOYING, TargetState.ACTIVE, TargetState.REMOVED, TargetState.FAILED)
# Sent back to the previous version (REVERT_FAILED included: a late confirmation still counts).
_GOING_BACK = (TargetState.REVERTING, TargetState.REVERTED, TargetState.REVERT_FAILED)


@dataclass(frozen=True, slots=True)
class Target:
    device_id: str
    wave: int
    state: TargetState
    rev: int | None = None
    started_at: datetime | None = None
    previous_version: int | None = None  # the version number it ran before (None: none)
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """What a device said for this rollout: ACTIVE or FAILED of a version; for an undeploy,
    REMOVED (the model unloaded, by its status or by the reported state of a rev at least
    this high that no longer lists it) or FAILED to remove it."""

    device_id: str
    rev: int
    version: int | None
    state: str
    reason: str | None = None


@dataclass
class Decision:
    """What to write: target changes, who to send the new version, who to send back, and the
    rollout's next state and wave."""

    state: RolloutState
    wave: int
    reason: str | None = None
    targets: dict[str, Target] = field(default_factory=dict)
    deploy: list[str] = field(default_factory=list)
    revert: list[Target] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.targets or self.deploy or self.revert)


def step(
    *,
    state: RolloutState,
    wave: int,
    version: int | None,
    strategy: Strategy,
    targets: list[Target],
    reports: list[Report],
    now: datetime,
) -> Decision:
    """One round of the state machine for one rollout; ``version`` None is an undeploy."""
    book = _Book({t.device_id: t for t in targets})
    _apply_reports(book, reports, version)
    _apply_timeouts(book, strategy, now)
    decision = Decision(state=state, wave=wave, targets=book.changed)
    if state is RolloutState.IN_PROGRESS:
        done = TargetState.REMOVED if version is None else TargetState.ACTIVE
        _in_progress(decision, book, strategy, now, done)
    if decision.state is RolloutState.ABORTING:
        _aborting(decision, book)
    return decision


@dataclass
class _Book:
    """The targets as this round leaves them, and which of them it changed."""

    current: dict[str, Target]
    changed: dict[str, Target] = field(default_factory=dict)

    def put(self, target: Target, state: TargetState, reason: str | None = None) -> None:
        new = replace(target, state=state, reason=reason)
        self.current[target.device_id] = self.changed[target.device_id] = new

    def all(self) -> list[Target]:
        return list(self.current.values())


def _apply_reports(book: _Book, reports: list[Report], version: int | None) -> None:
    """The latest verdict a device sent on the rev it was given counts, in either direction:
    an agent that re-applies a rev after a crash may report FAILED, then ACTIVE (it serves
    the version, health-checked), or the reverse (it went back to the old one)."""
    latest: dict[str, tuple[TargetState, str | None]] = {}
    for report in reports:
        target = book.current.get(report.device_id)
        if target is None or target.rev is None or report.rev < target.rev:
            continue  # not ours, or from before the rev this target is waiting on
        verdict = _verdict(target, report, version)
        if verdict is not None:
            latest[report.device_id] = verdict
    for device_id, (state, reason) in latest.items():
        target = book.current[device_id]
        if (target.state, target.reason) != (state, reason):
            book.put(target, state, reason)


def _verdict(
    target: Target, report: Report, version: int | None
) -> tuple[TargetState, str | None] | None:
    """What ``report`` makes of ``target`` (None: nothing)."""
    if target.state in _TOOK_NEW and version is None:
        if report.state == "REMOVED":
            return TargetState.REMOVED, "model unloaded"
        if report.state == "FAILED":
            return TargetState.FAILED, report.reason or "removal failed"
    elif target.state in _TOOK_NEW and report.version == version:
        if report.state == "ACTIVE":
            return TargetState.ACTIVE, None
        if report.state == "FAILED":
            return TargetState.FAILED, report.reason or "failed"
    elif (
        target.state in _GOING_BACK
        and target.previous_version is not None
        and report.version == target.previous_version
    ):
        if report.state == "ACTIVE":
            return TargetState.REVERTED, f"back on version {report.version}"
        if report.state == "FAILED":
            return TargetState.REVERT_FAILED, report.reason or "revert failed"
    return None


def _apply_timeouts(book: _Book, strategy: Strategy, now: datetime) -> None:
    limit = timedelta(seconds=strategy.device_timeout_s)
    for target in book.all():
        if target.started_at is None or now - target.started_at < limit:
            continue
        waited = f"no answer within {strategy.device_timeout_s:g} s"
        if target.state is TargetState.DEPLOYING:
            book.put(target, TargetState.FAILED, f"timed out: {waited}")
        elif target.state is TargetState.REVERTING:
            book.put(target, TargetState.REVERT_FAILED, f"revert timed out: {waited}")


def _in_progress(
    decision: Decision, book: _Book, strategy: Strategy, now: datetime, done: TargetState
) -> None:
    """``done``: what a device that did what was asked is (ACTIVE; REMOVED for an undeploy)."""
    current = book.all()
    states = [t.state for t in current]
    failed = states.count(TargetState.FAILED)
    finished = failed + states.count(done)
    if failed >= strategy.min_failures and failed / finished >= strategy.failure_threshold:
        decision.state = RolloutState.ABORTING
        decision.reason = (
            f"{failed} of {finished} devices failed (abort at {strategy.failure_threshold:.0%}"
            f" after {strategy.min_failures})"
        )
        return
    if not current:
        decision.state = RolloutState.COMPLETED
        decision.reason = "no target device left (deleted)"
        return
    waves = max(t.wave for t in current)
    decision.wave = max(decision.wave, 0)
    in_wave = [t for t in current if t.wave == decision.wave]
    while not in_wave and decision.wave < waves:
        # Emptied by device deletions (targets go with their device): nothing to wait for.
        decision.wave += 1
        in_wave = [t for t in current if t.wave == decision.wave]
    active = sum(t.state is done for t in in_wave)
    undecided = [t for t in in_wave if t.state in (TargetState.PENDING, TargetState.DEPLOYING)]
    if not in_wave or active / len(in_wave) >= strategy.success_threshold:
        if in_wave and decision.wave < waves:
            decision.wave += 1
        elif not any(t.state in (TargetState.PENDING, TargetState.DEPLOYING) for t in current):
            decision.state = RolloutState.COMPLETED
            return
    elif not undecided:
        decision.state = RolloutState.ABORTING
        decision.reason = (
            f"wave {decision.wave}: {active} of {len(in_wave)} devices {done.value}, below the "
            f"success threshold {strategy.success_threshold:.0%}"
        )
        return
    decision.deploy = _due(current, decision.wave, strategy, now)


def _due(current: list[Target], wave: int, strategy: Strategy, now: datetime) -> list[str]:
    """The current wave's devices not sent the new version yet, within the rate limit."""
    pending = sorted(
        t.device_id for t in current if t.wave <= wave and t.state is TargetState.PENDING
    )
    if strategy.max_devices_per_minute is None:
        return pending
    minute_ago = now - timedelta(minutes=1)
    recent = sum(1 for t in current if t.started_at and t.started_at > minute_ago)
    return pending[: max(0, strategy.max_devices_per_minute - recent)]


def _aborting(decision: Decision, book: _Book) -> None:
    for target in book.all():
        if target.state is TargetState.PENDING:
            book.put(target, TargetState.SKIPPED, "rollout aborted before its wave")
        elif target.state in _TOOK_NEW and target.rev is not None:
            decision.revert.append(target)
    if not decision.revert and not any(t.state is TargetState.REVERTING for t in book.all()):
        decision.state = RolloutState.ABORTED
