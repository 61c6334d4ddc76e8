"""The rollout store on SQLite and PostgreSQL: superseding, operators' commands racing the
engine, fenced writes, and reads that stay bounded however much devices report."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, update

from cloud.context import CloudContext
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent, Rollout, RolloutTarget
from cloud.rollout.progress import Decision
from cloud.rollout.reads import reports_for
from cloud.rollout.store import (
    Deposed,
    apply_decision,
    command,
    create_rollout,
    revert_target,
    start_target,
)
from cloud.rollout.strategy import RolloutState, Strategy
from shared.errors import Conflict
from tests.cloud.rollout.support import (
    MODEL,
    devices,
    engine,
    report,
    rollout,
    set_state,
    start,
    targets,
)

LIFETIME = timedelta(days=1)


def test_a_new_rollout_supersedes_running_and_paused_ones_but_not_an_abort(
    cloud: CloudContext,
) -> None:
    """IN_PROGRESS and PAUSED rollouts of the model are superseded; while one is ABORTING
    (its devices on their way back), a new rollout is refused with 409 and nothing changes,
    so the abort finishes and the new rollout never records the bad version as 'previous'."""
    devices(cloud, 2)
    running, paused = start(cloud, 2), start(cloud, 2)
    set_state(cloud, paused, "PAUSED")
    assert rollout(cloud, running)[0] == "SUPERSEDED"  # by ``paused`` when it was created
    newer = start(cloud, 3)
    assert rollout(cloud, paused) == ("SUPERSEDED", f"superseded by rollout {newer}")
    set_state(cloud, newer, "ABORTING")
    with pytest.raises(Conflict, match=rf"rollout {newer} of {MODEL} is ABORTING") as refused:
        start(cloud, 2)
    assert refused.value.status_code == 409
    assert rollout(cloud, newer)[0] == "ABORTING"
    with cloud.database.session() as s:
        assert s.scalar(select(Rollout.id).order_by(Rollout.id.desc()).limit(1)) == newer


def test_superseding_waits_for_an_engine_write_in_flight(cloud: CloudContext) -> None:
    """The engine is committing ABORTING on the older rollout while an operator creates a
    newer one: the creation waits for the engine's transaction (row lock on PostgreSQL,
    the write lock on SQLite), then sees ABORTING and is refused; it never overwrites it."""
    devices(cloud, 2)
    older = start(cloud, 2)
    locked, release = threading.Event(), threading.Event()

    def engine_commits_abort() -> None:
        with cloud.database.session() as s:
            s.execute(update(Rollout).where(Rollout.id == older).values(state="ABORTING"))
            locked.set()
            release.wait(10)

    writer = threading.Thread(target=engine_commits_abort)
    writer.start()
    assert locked.wait(10)
    outcome: list[BaseException | int] = []

    def operator_creates() -> None:
        try:
            outcome.append(start(cloud, 3))
        except BaseException as exc:
            outcome.append(exc)

    creator = threading.Thread(target=operator_creates)
    creator.start()
    creator.join(0.5)  # it waits on the engine's lock meanwhile
    release.set()
    writer.join(10)
    creator.join(30)
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], Conflict), outcome
    assert rollout(cloud, older)[0] == "ABORTING"


def test_an_operator_command_never_overwrites_what_the_engine_just_wrote(
    sqlite_cloud: CloudContext,
) -> None:
    """SQLite has no row locks: the engine commits COMPLETED between the command's look at
    the rollout and its write. The command's write is conditional on the state it may start
    from, so it matches nothing and is refused (409); COMPLETED stays."""
    context = sqlite_cloud
    devices(context, 1)
    rollout_id = start(context, 2)
    raced: list[bool] = []

    def engine_completes_first(conn: Any, _c: Any, statement: str, *_a: Any) -> None:
        # Before the command's first write: until then SQLite holds no lock for it.
        if raced or not statement.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            return
        raced.append(True)
        with context.database.session() as other:
            other.execute(update(Rollout).where(Rollout.id == rollout_id).values(state="COMPLETED"))

    event.listen(context.database.engine, "before_cursor_execute", engine_completes_first)
    try:
        with (
            pytest.raises(Conflict, match="is COMPLETED: cannot abort"),
            context.database.session() as s,
        ):
            command(s, rollout_id=rollout_id, action="abort", actor="admin")
    finally:
        event.remove(context.database.engine, "before_cursor_execute", engine_completes_first)
    assert raced
    assert rollout(context, rollout_id)[0] == "COMPLETED"


def test_a_stale_fencing_token_is_refused_by_every_engine_write(cloud: CloudContext) -> None:
    """A newer engine wrote with token 5: the old one's token 4 is Deposed in apply_decision,
    start_target and revert_target alike, and none of them changes a row."""
    (device,) = devices(cloud, 1)
    rollout_id = start(cloud, 2)
    with cloud.database.session() as s:
        s.execute(update(Rollout).where(Rollout.id == rollout_id).values(fence=5))
    key = cloud.signing_key
    decision = Decision(state=RolloutState.ABORTING, wave=0, reason="stale")
    writes = {
        "apply_decision": lambda s: apply_decision(
            s, rollout_id=rollout_id, token=4, expect="IN_PROGRESS", decision=decision
        ),
        "start_target": lambda s: start_target(
            s, rollout_id=rollout_id, token=4, device_id=device, key=key, lifetime=LIFETIME
        ),
        "revert_target": lambda s: revert_target(
            s, rollout_id=rollout_id, token=4, device_id=device, key=key, lifetime=LIFETIME
        ),
    }
    for name, write in writes.items():
        with (
            pytest.raises(Deposed, match="a newer engine holds it"),
            cloud.database.session() as s,
        ):
            write(s)
        assert rollout(cloud, rollout_id)[0] == "IN_PROGRESS", name
        assert targets(cloud, rollout_id) == {device: "PENDING"}, name


def test_reports_are_read_bounded_however_much_a_device_repeats_itself(
    cloud: CloudContext,
) -> None:
    """A device repeats its ACTIVE 300 times and sends 300 reports of an older rev: the
    engine reads one row per distinct verdict at or above the rev each target waits on."""
    a, b = devices(cloud, 2)
    rollout_id = start(cloud, 2, canary=2)
    run, _published = engine(cloud)
    assert run.tick()
    with cloud.database.session() as s:
        rows = s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id))
        target_rev = {t.device_id: t.rev or 0 for t in rows}
        now = datetime.now(UTC)
        for i in range(300):
            for rev in (target_rev[a], target_rev[a] - 1):
                s.add(
                    DeploymentEvent(
                        device_id=a,
                        rev=rev,
                        rollout_id=rollout_id,
                        model=MODEL,
                        version=2,
                        state="ACTIVE",
                        at=now,
                        reason=f"#{i}",
                    )
                )
    report(cloud, rollout_id, b, "FAILED", 2)
    with cloud.database.session() as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        reports = reports_for(s, row)
    assert [(r.device_id, r.rev, r.state) for r in reports] == [
        (a, target_rev[a], "ACTIVE"),
        (b, target_rev[b], "FAILED"),
    ]


def test_creating_a_rollout_reads_ids_and_labels_only(cloud: CloudContext) -> None:
    """Selecting the devices reads their ids and labels, never their signed documents; a
    device whose labels do not all match is left out."""
    ids = devices(cloud, 3)
    with cloud.database.session() as s:
        repository.enroll_device(s, device_id="other", labels={"site": "y"})
        repository.enroll_device(s, device_id="both", labels={"site": "x", "tier": "gold"})
    statements: list[str] = []

    def record(_conn: Any, _c: Any, statement: str, *_a: Any) -> None:
        statements.append(statement)

    event.listen(cloud.database.engine, "before_cursor_execute", record)
    try:
        with cloud.database.session() as s:
            created = create_rollout(
                s, model=MODEL, version=2, selector={"site": "x"}, strategy=Strategy(canary=1)
            )
            rollout_id = created.id
    finally:
        event.remove(cloud.database.engine, "before_cursor_execute", record)
    assert sorted(targets(cloud, rollout_id)) == sorted([*ids, "both"])
    device_reads = [q for q in statements if "FROM devices" in q]
    assert device_reads, statements
    assert not any("desired_document" in q for q in device_reads), device_reads
