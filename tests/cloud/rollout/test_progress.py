"""The rollout state machine, rule by rule, on rows made by hand (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from cloud.rollout.progress import Report, Target, step
from cloud.rollout.strategy import RolloutState, Strategy, TargetState, plan_waves

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
NEW = 2  # the version being rolled out; devices ran version 1 before


def _targets(strategy: Strategy, count: int = 10) -> list[Target]:
    waves = plan_waves(7, [f"d{i:02d}" for i in range(count)], strategy)
    return [Target(d, w, TargetState.PENDING, previous_version=1) for d, w in waves.items()]


def _sent(targets: list[Target], devices: list[str], rev: int = 5) -> list[Target]:
    return [
        replace(t, state=TargetState.DEPLOYING, rev=rev, started_at=NOW)
        if t.device_id in devices
        else t
        for t in targets
    ]


def _run(strategy: Strategy, targets: list[Target], reports: list[Report], **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "state": RolloutState.IN_PROGRESS, "wave": 0, "version": NEW, "strategy": strategy,
        "targets": targets, "reports": reports, "now": NOW,
    }  # fmt: skip
    return step(**(args | kw))  # type: ignore[arg-type]


def test_waves_start_with_the_canary_and_grow_by_the_factor() -> None:
    """Ten devices, a canary of one, growth 2: waves of 1, 2, 4 and the last 3; the same plan
    whoever computes it, and not simply the first devices by name."""
    strategy = Strategy(canary=1, growth=2)
    waves = plan_waves(7, [f"d{i:02d}" for i in range(10)], strategy)
    sizes = [list(waves.values()).count(w) for w in range(4)]
    assert sizes == [1, 2, 4, 3]
    assert waves == plan_waves(7, list(reversed(list(waves))), strategy)
    percent = plan_waves(7, [f"d{i}" for i in range(200)], Strategy(canary_percent=5, growth=3))
    assert list(percent.values()).count(0) == 10


def test_the_first_round_sends_only_the_canary() -> None:
    strategy = Strategy(canary=1)
    decision = _run(strategy, _targets(strategy), [], wave=-1)
    assert decision.wave == 0
    assert len(decision.deploy) == 1
    assert decision.state is RolloutState.IN_PROGRESS


def test_a_canary_active_after_its_health_check_opens_the_next_wave() -> None:
    strategy = Strategy(canary=1, growth=2)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    decision = _run(strategy, targets, [Report(canary, 5, NEW, "ACTIVE")])
    assert decision.targets[canary].state is TargetState.ACTIVE
    assert decision.wave == 1
    assert sorted(decision.deploy) == sorted(t.device_id for t in targets if t.wave == 1)


def test_reports_of_an_older_rev_or_another_version_do_not_count() -> None:
    """An ACTIVE from before this rollout's rev (or for the old version) is not success."""
    strategy = Strategy(canary=1)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary], rev=5)
    reports = [Report(canary, 4, NEW, "ACTIVE"), Report(canary, 5, 1, "ACTIVE")]
    decision = _run(strategy, targets, reports)
    assert decision.targets == {}
    assert decision.wave == 0
    assert decision.deploy == []


def test_a_failed_canary_aborts_sends_it_back_and_skips_everyone_else() -> None:
    strategy = Strategy(canary=1, min_failures=1, failure_threshold=0.5)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    decision = _run(strategy, targets, [Report(canary, 5, NEW, "FAILED", "HEALTHCHECK: off")])
    assert decision.state is RolloutState.ABORTING
    assert "1 of 1 devices failed" in (decision.reason or "")
    assert [t.device_id for t in decision.revert] == [canary]
    skipped = [d for d, t in decision.targets.items() if t.state is TargetState.SKIPPED]
    assert len(skipped) == 9
    assert decision.deploy == []


def test_failures_below_the_threshold_or_the_minimum_count_do_not_abort() -> None:
    """One failure of four finished with min_failures=2: go on."""
    strategy = Strategy(canary=4, min_failures=2, failure_threshold=0.2, success_threshold=0.7)
    targets = _targets(strategy)
    wave0 = [t.device_id for t in targets if t.wave == 0]
    targets = _sent(targets, wave0)
    reports = [Report(d, 5, NEW, "ACTIVE") for d in wave0[:3]]
    reports.append(Report(wave0[3], 5, NEW, "FAILED", "disk"))
    decision = _run(strategy, targets, reports)
    assert decision.state is RolloutState.IN_PROGRESS
    assert decision.wave == 1


def test_a_silent_device_times_out_and_counts_as_failed() -> None:
    strategy = Strategy(canary=1, device_timeout_s=60)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    assert _run(strategy, targets, [], now=NOW + timedelta(seconds=59)).targets == {}
    decision = _run(strategy, targets, [], now=NOW + timedelta(seconds=61))
    assert decision.targets[canary].state is TargetState.FAILED
    assert "timed out" in (decision.targets[canary].reason or "")
    assert decision.state is RolloutState.ABORTING


def test_a_wave_that_cannot_reach_the_success_threshold_aborts_instead_of_hanging() -> None:
    """Success 100 %, one device of the wave failed but failures are tolerated: the wave can
    never advance, so the rollout ends (no rollout stays IN_PROGRESS forever)."""
    strategy = Strategy(canary=2, success_threshold=1.0, failure_threshold=0.9)
    targets = _targets(strategy)
    wave0 = [t.device_id for t in targets if t.wave == 0]
    targets = _sent(targets, wave0)
    reports = [Report(wave0[0], 5, NEW, "ACTIVE"), Report(wave0[1], 5, NEW, "FAILED")]
    decision = _run(strategy, targets, reports)
    assert decision.state is RolloutState.ABORTING
    assert "below the success threshold" in (decision.reason or "")


def test_the_last_wave_active_completes_the_rollout() -> None:
    strategy = Strategy(canary=1, growth=100)
    targets = _targets(strategy, count=3)
    everyone = [t.device_id for t in targets]
    targets = [replace(t, state=TargetState.ACTIVE, rev=5) for t in _sent(targets, everyone)]
    decision = _run(strategy, targets, [], wave=1)
    assert decision.state is RolloutState.COMPLETED


def test_the_rate_limit_holds_back_devices_of_an_open_wave() -> None:
    strategy = Strategy(canary=1, growth=100, max_devices_per_minute=3)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    decision = _run(strategy, targets, [Report(canary, 5, NEW, "ACTIVE")])
    assert decision.wave == 1
    assert len(decision.deploy) == 2  # 3 a minute, one of them the canary a moment ago
    later = _run(
        strategy, targets, [Report(canary, 5, NEW, "ACTIVE")], now=NOW + timedelta(minutes=2)
    )
    assert len(later.deploy) == 3


def test_an_abort_ends_once_every_device_is_back() -> None:
    strategy = Strategy(canary=2)
    targets = _targets(strategy, count=2)
    a, b = (t.device_id for t in targets)
    reverting = [replace(t, state=TargetState.REVERTING, rev=9, started_at=NOW) for t in targets]
    decision = _run(strategy, reverting, [Report(a, 9, 1, "ACTIVE")], state=RolloutState.ABORTING)
    assert decision.targets[a].state is TargetState.REVERTED
    assert decision.state is RolloutState.ABORTING  # b has not confirmed yet
    done = _run(
        strategy, [replace(t, state=TargetState.REVERTED) for t in reverting], [],
        state=RolloutState.ABORTING,
    )  # fmt: skip
    assert done.state is RolloutState.ABORTED
    assert b in {t.device_id for t in reverting}


def test_a_paused_rollout_records_reports_but_sends_nothing() -> None:
    strategy = Strategy(canary=1)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    decision = _run(
        strategy, targets, [Report(canary, 5, NEW, "ACTIVE")], state=RolloutState.PAUSED
    )
    assert decision.targets[canary].state is TargetState.ACTIVE
    assert decision.deploy == []
    assert decision.wave == 0


@pytest.mark.parametrize(
    "bad",
    [{"canary": 0}, {"growth": 0.5}, {"success_threshold": 0}, {"failure_threshold": 1.5},
     {"device_timeout_s": -1}, {"canary": None}, {"surprise": 1}],
)  # fmt: skip
def test_a_strategy_out_of_range_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Strategy.model_validate(bad)


def test_an_empty_wave_is_skipped_not_aborted() -> None:
    """Wave 0 held one device, deleted while it deployed (its target row went with it): the
    rollout goes on with wave 1 instead of aborting on '0 of 0 ACTIVE'."""
    strategy = Strategy(canary=1)
    targets = [Target(f"d{i}", 1, TargetState.PENDING, previous_version=1) for i in range(3)]
    targets.append(Target("d9", 2, TargetState.PENDING, previous_version=1))
    decision = _run(strategy, targets, [])
    assert decision.state is RolloutState.IN_PROGRESS
    assert decision.wave == 1
    assert decision.deploy == ["d0", "d1", "d2"]


def test_a_rollout_whose_devices_are_all_gone_completes() -> None:
    """No target left at all (every device deleted): nothing can fail, nothing to wait for."""
    decision = _run(Strategy(canary=1), [], [], wave=2)
    assert decision.state is RolloutState.COMPLETED
    assert "no target device" in (decision.reason or "")


def test_a_later_active_for_the_same_rev_wins_over_a_failed() -> None:
    """An agent that reported FAILED and then, re-applying the same rev after a crash, ACTIVE
    after its health check: the device serves the version, so its target is ACTIVE (the
    latest verdict on the rev counts, in either direction) and the wave goes on."""
    strategy = Strategy(canary=1, min_failures=2)
    targets = _targets(strategy)
    canary = next(t.device_id for t in targets if t.wave == 0)
    targets = _sent(targets, [canary])
    reports = [Report(canary, 5, NEW, "FAILED", "HEALTHCHECK"), Report(canary, 5, NEW, "ACTIVE")]
    decision = _run(strategy, targets, reports)
    assert decision.targets[canary].state is TargetState.ACTIVE
    assert decision.wave == 1
    failed = [replace(t, state=TargetState.FAILED) if t.device_id == canary else t for t in targets]
    assert _run(strategy, failed, reports).targets[canary].state is TargetState.ACTIVE
    again = list(reversed(reports))  # ACTIVE, then FAILED on a re-apply: FAILED now
    assert _run(strategy, targets, again).targets[canary].state is TargetState.FAILED
    active = [replace(t, state=TargetState.ACTIVE) if t.device_id == canary else t for t in targets]
    settled = _run(strategy, active, reports)  # nothing new: nothing written
    assert canary not in settled.targets


def test_a_revert_that_times_out_is_revert_failed() -> None:
    strategy = Strategy(canary=1, device_timeout_s=30)
    targets = _targets(strategy, count=2)
    reverting = [replace(t, state=TargetState.REVERTING, rev=9, started_at=NOW) for t in targets]
    decision = _run(
        strategy, reverting, [], state=RolloutState.ABORTING, now=NOW + timedelta(seconds=31)
    )
    assert {t.state for t in decision.targets.values()} == {TargetState.REVERT_FAILED}
    assert all("revert timed out" in (t.reason or "") for t in decision.targets.values())
    assert decision.state is RolloutState.ABORTED


def test_a_device_that_never_took_the_version_is_not_sent_back() -> None:
    """A target FAILED without a rev (the cloud could not sign it a new one) never ran the
    version: an abort leaves it alone, and ends without waiting for it."""
    strategy = Strategy(canary=2)
    targets = _targets(strategy, count=2)
    a, b = (t.device_id for t in targets)
    targets = [
        replace(targets[0], state=TargetState.FAILED, reason="cannot be moved"),
        replace(targets[1], state=TargetState.ACTIVE, rev=5),
    ]
    decision = _run(strategy, targets, [], state=RolloutState.ABORTING)
    assert [t.device_id for t in decision.revert] == [b]
    assert a not in decision.targets
    done = _run(
        strategy, [targets[0], replace(targets[1], state=TargetState.REVERTED)], [],
        state=RolloutState.ABORTING,
    )  # fmt: skip
    assert done.state is RolloutState.ABORTED
