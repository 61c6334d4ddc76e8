"""The rollout engine against a real registry: devices that cannot be moved fail alone, one
broken rollout does not stop the others, aborts send devices back to what they ran when
they were moved, and commands that arrive mid-round are obeyed."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import update

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.fleet.desired import MAX_REV
from cloud.registry.tables import DeploymentEvent, Rollout, RolloutTarget
from cloud.rollout.store import command, create_rollout
from cloud.rollout.strategy import Strategy
from tests.cloud.fleet.desired_support import add_models, running_fleet
from tests.cloud.rollout.support import (
    MODEL,
    deploy,
    desired_versions,
    devices,
    engine,
    reasons,
    report,
    rollout,
    set_state,
    start,
    targets,
)
from tests.conftest import serve_in_thread
from tests.fleet_harness import wait_for


def _at_max_rev(context: CloudContext, device_id: str) -> None:
    """The device (buggy or hostile) reports the highest rev the schema holds."""
    with context.database.session() as s:
        s.add(DeploymentEvent(device_id=device_id, rev=MAX_REV, rollout_id=None, model=MODEL,
                              version=1, state="ACTIVE", at=datetime.now(UTC)))  # fmt: skip


def test_a_device_that_cannot_take_a_new_rev_fails_alone(cloud: CloudContext) -> None:
    """One device of the wave reports rev MAX_REV, so no higher rev can be signed for it: it
    is FAILED with the reason in the first round, and the others are sent the version."""
    stuck, *others = devices(cloud, 3)
    _at_max_rev(cloud, stuck)
    rollout_id = start(cloud, 2, canary=3, min_failures=2, success_threshold=0.6)
    run, published = engine(cloud)
    assert run.tick()
    assert targets(cloud, rollout_id) == {stuck: "FAILED"} | dict.fromkeys(others, "DEPLOYING")
    assert (reasons(cloud, rollout_id)[stuck] or "").startswith("cannot be moved: ")
    assert "no higher rev can be signed" in (reasons(cloud, rollout_id)[stuck] or "")
    assert sorted(published) == sorted(others)
    assert run.unmovable == 1
    for device_id in others:
        report(cloud, rollout_id, device_id, "ACTIVE", 2)
    assert run.tick()
    assert rollout(cloud, rollout_id)[0] == "COMPLETED"


def test_a_device_that_cannot_be_sent_back_is_revert_failed_and_the_abort_ends(
    cloud: CloudContext,
) -> None:
    """Aborting: one device took the version, then reports MAX_REV; it cannot be sent back,
    so it is REVERT_FAILED with the reason while the other is reverted, and the abort ends."""
    a, b = devices(cloud, 2)
    for device_id in (a, b):
        deploy(cloud, device_id, 1)
    rollout_id = start(cloud, 2, canary=2)
    run, published = engine(cloud)
    assert run.tick()
    _at_max_rev(cloud, a)
    with cloud.database.session() as s:
        command(s, rollout_id=rollout_id, action="abort", actor="admin")
    assert run.tick()
    assert targets(cloud, rollout_id) == {a: "REVERT_FAILED", b: "REVERTING"}
    why = reasons(cloud, rollout_id)[a]
    assert why is not None
    assert "no higher rev can be signed" in why
    report(cloud, rollout_id, b, "ACTIVE", 1)
    assert run.tick()
    assert rollout(cloud, rollout_id)[0] == "ABORTED"
    assert published.count(b) == 2


def test_a_rollout_whose_strategy_no_longer_validates_is_aborted_and_the_rest_go_on(
    cloud: CloudContext,
) -> None:
    """Rollout 1's stored strategy has a field since removed: it ends ABORTING ('strategy
    invalid: …'), its device goes back, and rollout 2 (another model) advances meanwhile."""
    add_models(cloud, ("beta",), versions=2)
    (device,) = devices(cloud, 1)
    deploy(cloud, device, 1)
    first = start(cloud, 2)
    run, _published = engine(cloud)
    assert run.tick()
    with cloud.database.session() as s:
        second = create_rollout(
            s, model="beta", version=2, selector={"site": "x"}, strategy=Strategy(canary=1)
        ).id
        row = s.get(Rollout, first)
        assert row is not None
        row.strategy = {**row.strategy, "old_field": 1}
    assert run.tick()
    state, reason = rollout(cloud, first)
    assert state == "ABORTING"
    assert reason is not None
    assert reason.startswith("strategy invalid:")
    assert targets(cloud, second) == {device: "DEPLOYING"}
    assert run.tick()
    assert targets(cloud, first) == {device: "REVERTING"}
    report(cloud, first, device, "ACTIVE", 1)
    assert run.tick()
    assert rollout(cloud, first)[0] == "ABORTED"


def test_a_rollout_the_engine_cannot_decide_is_given_up_and_the_rest_go_on(
    sqlite_cloud: CloudContext,
) -> None:
    """A target row in a state this engine does not know (written by a newer release, or
    damaged): every round over it raises. The error is logged and counted, the rollouts
    after it still advance, and after ``give_up_after`` rounds in a row (over at least
    ``give_up_after_s``, here 0) it is ended with the reason rather than retried forever
    (ABORTING first; ABORTED when even that cannot be decided)."""
    context = sqlite_cloud
    add_models(context, ("beta",), versions=2)
    (device,) = devices(context, 1)
    first = start(context, 2)
    with context.database.session() as s:
        s.execute(update(RolloutTarget).where(RolloutTarget.rollout_id == first)
                  .values(state="SOMETHING_NEW"))  # fmt: skip
        second = create_rollout(
            s, model="beta", version=2, selector={"site": "x"}, strategy=Strategy(canary=1)
        ).id
    run, _published = engine(context)
    run.give_up_after, run.give_up_after_s = 3, 0.0
    assert run.tick()
    assert targets(context, second) == {device: "DEPLOYING"}
    assert run.errors == 1
    assert rollout(context, first)[0] == "IN_PROGRESS"
    for _ in range(2):
        assert run.tick()
    state, reason = rollout(context, first)
    assert state == "ABORTING"
    assert reason is not None
    assert "SOMETHING_NEW" in reason
    for _ in range(3):
        assert run.tick()
    state, reason = rollout(context, first)
    assert state == "ABORTED"
    assert reason is not None
    assert "could not be decided" in reason
    assert run.errors == 6


def test_an_abort_sends_a_device_back_to_what_it_ran_when_it_was_moved(
    cloud: CloudContext,
) -> None:
    """v1 at creation, then a manual hotfix to v2 before the rollout reached the device: the
    rollout's v3 replaces v2, so an abort sends it back to v2, not to v1."""
    (device,) = devices(cloud, 1)
    deploy(cloud, device, 1)
    rollout_id = start(cloud, 3)
    deploy(cloud, device, 2)
    run, _published = engine(cloud)
    assert run.tick()
    assert desired_versions(cloud, device) == [3]
    with cloud.database.session() as s:
        command(s, rollout_id=rollout_id, action="abort", actor="admin")
    assert run.tick()
    assert desired_versions(cloud, device) == [2]


def test_an_abort_takes_the_model_off_a_device_that_ran_none_before(
    sqlite_cloud: CloudContext,
) -> None:
    """A device that ran no version of the model: an abort removes the model from its desired
    state (a new, signed rev with no deployment), the target is REVERTED at once and the
    rollout ends."""
    context = sqlite_cloud
    (device,) = devices(context, 1)
    rollout_id = start(context, 2)
    run, published = engine(context)
    assert run.tick()
    assert desired_versions(context, device) == [2]
    with context.database.session() as s:
        command(s, rollout_id=rollout_id, action="abort", actor="admin")
    assert run.tick()
    assert desired_versions(context, device) == []
    assert targets(context, rollout_id) == {device: "REVERTED"}
    assert reasons(context, rollout_id)[device] == "model taken off the device"
    assert published == [device, device]
    assert run.tick()
    assert rollout(context, rollout_id)[0] == "ABORTED"


def test_a_pause_or_abort_between_the_decision_and_the_moves_is_obeyed(
    sqlite_cloud: CloudContext,
) -> None:
    """The operator pauses (then, in a second rollout, aborts) right after the first device
    of a wave was sent the version: the engine stops moving devices at once; those not
    reached stay PENDING (not FAILED), and the abort then skips them."""
    context = sqlite_cloud
    ids = devices(context, 3)
    rollout_id = start(context, 2, canary=3)
    action = ["pause"]

    def operator_acts(device_id: str) -> bool:
        with context.database.session() as s:
            command(s, rollout_id=rollout_id, action=action[0], actor="admin")
        return True

    run, _ = engine(context, publish=operator_acts)
    run.batch_size = 1  # one device a transaction: the operator acts between two of them
    run.release_after_s = 0.0  # each published once written (where the operator acts)
    assert run.tick()
    moved = [d for d, state in targets(context, rollout_id).items() if state == "DEPLOYING"]
    assert len(moved) == 1
    assert targets(context, rollout_id) == dict.fromkeys(ids, "PENDING") | {moved[0]: "DEPLOYING"}
    assert rollout(context, rollout_id)[0] == "PAUSED"
    assert run.unmovable == 0

    set_state(context, rollout_id, "IN_PROGRESS")
    action[0] = "abort"
    assert run.tick()
    assert rollout(context, rollout_id)[0] == "ABORTING"
    assert sorted(targets(context, rollout_id).values()) == ["DEPLOYING", "DEPLOYING", "PENDING"]
    action[0] = "pause"  # refused from ABORTING: the publish callback must not fail the test
    run.publish = lambda _d: True
    assert run.tick()
    assert sorted(targets(context, rollout_id).values()) == ["REVERTED", "REVERTED", "SKIPPED"]


def test_the_rate_limit_holds_over_real_rounds(sqlite_cloud: CloudContext) -> None:
    """Two devices a minute: two in the first round, none more within the minute, two more
    once it passed (the engine decides with the clock it is given)."""
    context = sqlite_cloud
    devices(context, 5)
    rollout_id = start(context, 2, canary=5, max_devices_per_minute=2)
    run, published = engine(context)
    now = datetime.now(UTC)
    assert run.tick(now)
    assert len(published) == 2
    assert run.tick(now + timedelta(seconds=30))
    assert len(published) == 2
    assert run.tick(now + timedelta(seconds=150))  # the minute passed, however slow the writes
    assert len(published) == 4
    assert list(targets(context, rollout_id).values()).count("PENDING") == 1


def test_stop_keeps_the_lease_while_a_round_is_still_running(sqlite_cloud: CloudContext) -> None:
    """stop() whose join times out (a round blocked in a publish) must not release the lease:
    another engine would act while this one still writes. The round's thread releases it
    when it ends."""
    context = sqlite_cloud
    devices(context, 1)
    start(context, 2)
    entered, leave = threading.Event(), threading.Event()

    def slow_publish(_device_id: str) -> bool:
        entered.set()
        return leave.wait(10)

    run, _ = engine(context, publish=slow_publish)
    run.start()
    try:
        assert entered.wait(10)
        run.stop(timeout=0.2)
        assert run.leadership.leader() == run.leadership.identity
    finally:
        leave.set()
    wait_for(lambda: run.leadership.leader() is None, 10, "the round's thread to release it")


def test_devices_that_cannot_be_moved_and_rollout_errors_are_in_metrics(
    sqlite_cloud: CloudContext,
) -> None:
    """The fleet service's engine fails a device at MAX_REV on its own: /metrics counts it
    (edgefleet_rollout_devices_unmovable) beside the rounds that raised (none here)."""
    context = sqlite_cloud
    (device,) = devices(context, 1)
    _at_max_rev(context, device)
    rollout_id = start(context, 2)
    with running_fleet(context, [device]) as fleet:
        wait_for(lambda: fleet.rollouts.unmovable == 1, 15, "the device to fail")
        with serve_in_thread(create_app(context, fleet)) as api:
            text = httpx.get(f"{api}/metrics", timeout=10).text
    assert "edgefleet_rollout_devices_unmovable_total 1.0" in text
    assert "edgefleet_rollout_engine_errors_total 0.0" in text
    assert targets(context, rollout_id) == {device: "FAILED"}
