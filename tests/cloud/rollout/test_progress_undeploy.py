"""The rollout state machine for an undeploy (version None), rule by rule: a device is done
only on REMOVED for the rev that dropped the model, waves advance on it, failures and
timeouts abort, and an abort puts the model back on every device told to drop it."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from cloud.rollout.progress import Decision, Report, Target, step
from cloud.rollout.strategy import RolloutState, Strategy, TargetState, plan_waves

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
RAN = 3  # the version the devices ran before the undeploy


def _targets(strategy: Strategy, count: int = 10) -> list[Target]:
    waves = plan_waves(11, [f"d{i:02d}" for i in range(count)], strategy)
    return [Target(d, w, TargetState.PENDING, previous_version=RAN) for d, w in waves.items()]


def _told(targets: list[Target], devices: list[str], rev: int = 8) -> list[Target]:
    return [
        replace(t, state=TargetState.DEPLOYING, rev=rev, started_at=NOW)
        if t.device_id in devices
        else t
        for t in targets
    ]


def _undeploy(
    strategy: Strategy,
    targets: list[Target],
    reports: list[Report],
    *,
    state: RolloutState = RolloutState.IN_PROGRESS,
    wave: int = 0,
    now: datetime = NOW,
) -> Decision:
    return step(
        state=state, wave=wave, version=None, strategy=strategy, targets=targets,
        reports=reports, now=now,
    )  # fmt: skip


def _canary(targets: list[Target]) -> str:
    return next(t.device_id for t in targets if t.wave == 0)


def test_a_canary_that_confirms_the_removal_opens_the_next_wave() -> None:
    strategy = Strategy(canary=1, growth=2)
    targets = _targets(strategy)
    canary = _canary(targets)
    targets = _told(targets, [canary])
    decision = _undeploy(strategy, targets, [Report(canary, 8, RAN, "REMOVED")])
    assert decision.targets[canary].state is TargetState.REMOVED
    assert decision.wave == 1
    assert sorted(decision.deploy) == sorted(t.device_id for t in targets if t.wave == 1)


def test_only_a_removal_at_or_after_the_rev_that_dropped_the_model_counts() -> None:
    """A REMOVED from an older rev (the model dropped once before and deployed again since)
    is no confirmation; neither is an ACTIVE (of any version) nor a REMOVED the device sent
    while its target was not waiting for one."""
    strategy = Strategy(canary=1)
    targets = _targets(strategy)
    canary = _canary(targets)
    waiting = _told(targets, [canary], rev=8)
    stale = [Report(canary, 7, RAN, "REMOVED"), Report(canary, 8, RAN, "ACTIVE")]
    assert _undeploy(strategy, waiting, stale).targets == {}
    other = next(t.device_id for t in targets if t.wave == 1)
    assert _undeploy(strategy, waiting, [Report(other, 9, RAN, "REMOVED")]).targets == {}


def test_a_deploy_rollout_does_not_take_a_removal_for_success() -> None:
    """The same REMOVED given to a rollout of a version: nothing changes."""
    strategy = Strategy(canary=1)
    targets = _told(_targets(strategy), [_canary(_targets(strategy))])
    decision = step(
        state=RolloutState.IN_PROGRESS, wave=0, version=4, strategy=strategy, targets=targets,
        reports=[Report(_canary(targets), 8, RAN, "REMOVED")], now=NOW,
    )  # fmt: skip
    assert decision.targets == {}


def test_every_wave_removed_completes_the_undeploy() -> None:
    strategy = Strategy(canary=1, growth=100)
    targets = _targets(strategy, count=3)
    everyone = [t.device_id for t in targets]
    reports = [Report(d, 8, None, "REMOVED", "reported without it") for d in everyone]
    decision = _undeploy(strategy, _told(targets, everyone), reports, wave=1)
    assert decision.state is RolloutState.COMPLETED
    assert {t.state for t in decision.targets.values()} == {TargetState.REMOVED}


def test_a_failed_removal_aborts_and_every_device_told_gets_the_model_back() -> None:
    """Canary of two: one confirmed, one FAILED to remove: abort. Both go back to the version
    they ran (the one that removed it too), the unreached are skipped."""
    strategy = Strategy(canary=2, min_failures=1, failure_threshold=0.5)
    targets = _targets(strategy)
    a, b = (t.device_id for t in targets if t.wave == 0)
    targets = _told(targets, [a, b])
    reports = [Report(a, 8, RAN, "REMOVED"), Report(b, 8, RAN, "FAILED", "removing: disk")]
    decision = _undeploy(strategy, targets, reports)
    assert decision.state is RolloutState.ABORTING
    assert decision.targets[b].reason == "removing: disk"
    assert sorted(t.device_id for t in decision.revert) == sorted([a, b])
    assert {t.previous_version for t in decision.revert} == {RAN}
    skipped = [t for t in decision.targets.values() if t.state is TargetState.SKIPPED]
    assert len(skipped) == 8


def test_a_device_that_never_confirms_times_out_and_aborts() -> None:
    strategy = Strategy(canary=1, device_timeout_s=30)
    targets = _told(_targets(strategy), [_canary(_targets(strategy))])
    assert _undeploy(strategy, targets, [], now=NOW + timedelta(seconds=29)).targets == {}
    decision = _undeploy(strategy, targets, [], now=NOW + timedelta(seconds=31))
    assert decision.targets[_canary(targets)].state is TargetState.FAILED
    assert decision.state is RolloutState.ABORTING


def test_an_aborted_undeploy_ends_once_the_model_is_back_on_every_device() -> None:
    """Reverting targets wait for ACTIVE on the version they ran; a REMOVED does not do."""
    strategy = Strategy(canary=2)
    targets = _targets(strategy, count=2)
    a, b = (t.device_id for t in targets)
    reverting = [replace(t, state=TargetState.REVERTING, rev=12, started_at=NOW) for t in targets]
    reports = [Report(a, 12, RAN, "ACTIVE"), Report(b, 12, RAN, "REMOVED")]
    decision = _undeploy(strategy, reverting, reports, state=RolloutState.ABORTING)
    assert decision.targets[a].state is TargetState.REVERTED
    assert b not in decision.targets
    assert decision.state is RolloutState.ABORTING
    back = [replace(t, state=TargetState.REVERTED) for t in reverting]
    assert _undeploy(strategy, back, [], state=RolloutState.ABORTING).state is (
        RolloutState.ABORTED
    )


def test_an_abort_also_sends_back_a_device_that_already_confirmed() -> None:
    strategy = Strategy(canary=1, growth=100)
    targets = _targets(strategy, count=3)
    canary = _canary(targets)
    targets = [
        replace(t, state=TargetState.REMOVED, rev=8) if t.device_id == canary else t
        for t in targets
    ]
    decision = _undeploy(strategy, targets, [], state=RolloutState.ABORTING, wave=1)
    assert [t.device_id for t in decision.revert] == [canary]
    assert decision.state is RolloutState.ABORTING
