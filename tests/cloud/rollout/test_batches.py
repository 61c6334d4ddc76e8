"""The engine moves a wave's devices in batches: one transaction per ``batch_size`` devices,
the wave's documents published together once its batches committed; a batch the database
rolls back leaves no device half moved and is tried again; a device that cannot be moved
fails alone."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from cloud.context import CloudContext
from cloud.fleet.desired import MAX_REV, stored_state
from cloud.registry.tables import AuditEvent, DeploymentEvent, Device
from tests.cloud.rollout.support import MODEL, devices, engine, start, targets


@contextmanager
def _writing_commits(context: CloudContext) -> Iterator[list[int]]:
    """Counts the commits of transactions that changed a device row (one per dispatch)."""
    commits: list[int] = []
    wrote: set[int] = set()

    def statement(conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if sql.lstrip().upper().startswith("UPDATE DEVICES"):
            wrote.add(id(conn))

    def commit(conn: Any) -> None:
        if id(conn) in wrote:
            wrote.discard(id(conn))
            commits.append(1)

    def rollback(conn: Any) -> None:
        wrote.discard(id(conn))

    db = context.database.engine
    event.listen(db, "before_cursor_execute", statement)
    event.listen(db, "commit", commit)
    event.listen(db, "rollback", rollback)
    try:
        yield commits
    finally:
        event.remove(db, "before_cursor_execute", statement)
        event.remove(db, "commit", commit)
        event.remove(db, "rollback", rollback)


@contextmanager
def _failing_batch(context: CloudContext, device_id: str, times: int) -> Iterator[list[int]]:
    """The database refuses (``times`` times) the audit rows of the batch that holds
    ``device_id``: after that batch's fence, device rows and targets were sent."""
    failures: list[int] = []

    def statement(_conn: Any, _cursor: Any, sql: str, params: Any, *_args: Any) -> None:
        ours = "INSERT INTO audit_events" in sql and device_id in repr(params)
        if ours and len(failures) < times:
            failures.append(1)
            raise OperationalError(sql, params, Exception("injected: connection lost"))

    db = context.database.engine
    event.listen(db, "before_cursor_execute", statement)
    try:
        yield failures
    finally:
        event.remove(db, "before_cursor_execute", statement)


@contextmanager
def _commit_heard_as_lost(
    context: CloudContext, device_id: str, *, then_refuse: bool
) -> Iterator[list[int]]:
    """The batch that holds ``device_id`` commits, but the engine hears an error (the
    connection dropped as the commit went through); with ``then_refuse`` the database then
    refuses every fenced write after it. Yields a list that holds one item once it struck."""
    seen: list[int] = []
    lost: list[int] = []

    def statement(_conn: Any, _cursor: Any, sql: str, params: Any, *_args: Any) -> None:
        if then_refuse and lost and sql.lstrip().upper().startswith("UPDATE ROLLOUTS"):
            raise OperationalError(sql, params, Exception("injected: database away"))
        if "INSERT INTO audit_events" in sql and device_id in repr(params):
            seen.append(1)

    def after_commit(_session: Session) -> None:
        if seen and not lost:
            lost.append(1)
            raise OperationalError("COMMIT", {}, Exception("injected: connection lost"))

    db = context.database.engine
    event.listen(db, "before_cursor_execute", statement)
    event.listen(Session, "after_commit", after_commit)
    try:
        yield lost
    finally:
        event.remove(db, "before_cursor_execute", statement)
        event.remove(Session, "after_commit", after_commit)


def _revs(context: CloudContext) -> dict[str, int]:
    with context.database.session() as s:
        return {d: r or 0 for d, r in s.execute(select(Device.id, Device.desired_rev)).all()}


def _signed(context: CloudContext) -> Counter[str]:
    """How many revs were signed for each device (its desired.sign audit events)."""
    with context.database.session() as s:
        subjects = s.scalars(select(AuditEvent.subject).where(AuditEvent.action == "desired.sign"))
        return Counter(subjects)


def test_a_wave_of_200_devices_is_sent_in_one_transaction_per_50(cloud: CloudContext) -> None:
    """200 devices in one wave, batches of 50: four transactions change device rows (one per
    device before), every device is DEPLOYING on rev 1 with its own signed document, and each
    is published once, after its batch committed (the publish sees it in a fresh session)."""
    ids = devices(cloud, 200)
    rollout_id = start(cloud, 2, canary=200)
    published: list[str] = []

    def publish(device_id: str) -> bool:
        with cloud.database.session() as s:
            device = s.get(Device, device_id)
            assert device is not None
            state = stored_state(device)
        assert state is not None, f"{device_id} published before its batch committed"
        assert state.rev == device.desired_rev == 1
        assert [d.manifest.version for d in state.deployments] == [2]
        published.append(device_id)
        return True

    run, _ = engine(cloud, publish=publish)
    with _writing_commits(cloud) as commits:
        assert run.tick()
    assert len(commits) == math.ceil(200 / 50)
    assert run.batch_size == 50  # the default (EDGEFLEET_ROLLOUT_BATCH_SIZE)
    assert targets(cloud, rollout_id) == dict.fromkeys(ids, "DEPLOYING")
    assert sorted(published) == ids
    assert set(_revs(cloud).values()) == {1}
    assert _signed(cloud) == Counter(dict.fromkeys(ids, 1))


def test_a_batch_rolled_back_midway_is_tried_again_and_moves_each_device_once(
    cloud: CloudContext,
) -> None:
    """The database drops the second batch's transaction once, after its device rows and
    targets were written: it is rolled back and sent again at once; every device ends on
    rev 1, signed once, published once."""
    ids = devices(cloud, 120)
    rollout_id = start(cloud, 2, canary=120)
    run, published = engine(cloud)
    with _failing_batch(cloud, "d075", times=1) as failures:
        assert run.tick()
    assert failures == [1]
    assert run.errors == 0
    assert run.batch_retries == 1
    assert targets(cloud, rollout_id) == dict.fromkeys(ids, "DEPLOYING")
    assert sorted(published) == ids
    assert set(_revs(cloud).values()) == {1}
    assert _signed(cloud) == Counter(dict.fromkeys(ids, 1))


def test_a_batch_the_database_keeps_refusing_leaves_no_device_half_moved(
    cloud: CloudContext,
) -> None:
    """The second batch fails on every attempt: the round stops there with the batches before
    it committed and published, and none of its devices changed (no rev, no document, still
    PENDING). Its devices are published all the same, as the error may have come with the
    commit: the broker gets what SQL holds for them, nothing new. Once the database takes it,
    the next round moves the rest."""
    ids = devices(cloud, 120)
    rollout_id = start(cloud, 2, canary=120)
    run, published = engine(cloud)
    with _failing_batch(cloud, "d075", times=3) as failures:
        assert run.tick()
    assert len(failures) == 3
    assert run.errors == 1
    first, rest = ids[:50], ids[50:]
    assert targets(cloud, rollout_id) == dict.fromkeys(first, "DEPLOYING") | dict.fromkeys(
        rest, "PENDING"
    )
    assert published == first + ids[50:100]
    revs = _revs(cloud)
    assert [revs[d] for d in rest] == [0] * len(rest)
    with cloud.database.session() as s:
        unsigned = s.scalars(select(Device).where(Device.id.in_(rest))).all()
        assert all(device.desired_document is None for device in unsigned)
    assert set(_signed(cloud)) == set(first)

    assert run.tick()
    assert targets(cloud, rollout_id) == dict.fromkeys(ids, "DEPLOYING")
    assert published[100:] == ids[50:]
    assert set(_revs(cloud).values()) == {1}
    assert _signed(cloud) == Counter(dict.fromkeys(ids, 1))


def test_devices_that_cannot_be_moved_fail_alone_within_a_batch(cloud: CloudContext) -> None:
    """Two devices of a 60-device wave report rev MAX_REV: their batches are split until each
    is found; they are FAILED and the other 58 are moved and published once each."""
    ids = devices(cloud, 60)
    stuck = {ids[7], ids[41]}
    with cloud.database.session() as s:
        for device_id in stuck:
            s.add(DeploymentEvent(device_id=device_id, rev=MAX_REV, rollout_id=None, model=MODEL,
                                  version=1, state="ACTIVE", at=datetime.now(UTC)))  # fmt: skip
    rollout_id = start(cloud, 2, canary=60, min_failures=3, success_threshold=0.5)
    run, published = engine(cloud)
    run.batch_size = 25
    assert run.tick()
    moved = [d for d in ids if d not in stuck]
    assert targets(cloud, rollout_id) == dict.fromkeys(moved, "DEPLOYING") | dict.fromkeys(
        stuck, "FAILED"
    )
    assert run.unmovable == 2
    assert sorted(published) == moved
    assert _signed(cloud) == Counter(dict.fromkeys(moved, 1))


def test_a_committed_batch_is_published_with_one_call(sqlite_cloud: CloudContext) -> None:
    """Given the keeper's publish_many, the engine hands each committed batch over in one call
    (one read of the batch's rows, not one session per device) and never one by one."""
    context = sqlite_cloud
    ids = devices(context, 120)
    start(context, 2, canary=120)
    calls: list[list[str]] = []

    def publish_many(device_ids: list[str]) -> int:
        calls.append(list(device_ids))
        return len(device_ids)

    run, published = engine(context)
    run.publish_many = publish_many
    assert run.tick()
    assert calls == [ids[:50], ids[50:100], ids[100:]]
    assert published == []


def test_a_batch_whose_commit_was_lost_but_happened_is_still_published(
    cloud: CloudContext,
) -> None:
    """The second batch commits, but the engine hears an error (the connection dropped as
    the commit went through): tried again, it finds those devices moved already and moves
    none twice, yet publishes them all, so no device waits for a document it was given."""
    ids = devices(cloud, 120)
    rollout_id = start(cloud, 2, canary=120)
    with _commit_heard_as_lost(cloud, "d075", then_refuse=False) as lost:
        run, published = engine(cloud)
        assert run.tick()
    assert lost == [1]
    assert run.batch_retries == 1
    assert targets(cloud, rollout_id) == dict.fromkeys(ids, "DEPLOYING")
    assert sorted(published) == ids
    assert set(_revs(cloud).values()) == {1}
    assert _signed(cloud) == Counter(dict.fromkeys(ids, 1))


def test_a_waves_documents_go_to_the_broker_together_once_every_batch_committed(
    cloud: CloudContext,
) -> None:
    """200 devices, batches of 50: nothing is published while the wave is still being written
    (its devices would join the chunk carousel over the whole time it takes, and miss each
    other's passes); after the fourth commit all 200 go out, in batches of 50."""
    ids = devices(cloud, 200)
    start(cloud, 2, canary=200)
    calls: list[tuple[int, list[str]]] = []
    run, _ = engine(cloud)
    with _writing_commits(cloud) as commits:

        def publish_many(device_ids: list[str]) -> int:
            calls.append((len(commits), list(device_ids)))
            return len(device_ids)

        run.publish_many = publish_many
        assert run.tick()
    assert [committed for committed, _ in calls] == [4, 4, 4, 4]
    assert [device_ids for _, device_ids in calls] == [ids[i : i + 50] for i in (0, 50, 100, 150)]


def test_a_wave_that_takes_long_to_write_is_released_in_parts(cloud: CloudContext) -> None:
    """The first batch's documents waited ``release_after_s`` by the time the next committed:
    they go out then, without waiting for the rest of the wave (a huge wave must not keep
    its first devices waiting for minutes)."""
    ids = devices(cloud, 120)
    start(cloud, 2, canary=120)
    calls: list[tuple[int, list[str]]] = []
    run, _ = engine(cloud)
    run.release_after_s = 0.0
    with _writing_commits(cloud) as commits:

        def publish_many(device_ids: list[str]) -> int:
            calls.append((len(commits), list(device_ids)))
            return len(device_ids)

        run.publish_many = publish_many
        assert run.tick()
    assert calls == [(1, ids[:50]), (2, ids[50:100]), (3, ids[100:])]


def test_what_was_written_before_the_lease_was_lost_is_still_released(
    cloud: CloudContext,
) -> None:
    """The lease cannot be renewed after the first batch: the engine stops acting, yet the
    batch it committed goes to the broker (its devices would otherwise wait for the next
    reconnect); the rest stays PENDING for the next leader."""
    ids = devices(cloud, 120)
    rollout_id = start(cloud, 2, canary=120)
    run, published = engine(cloud)
    checks: list[int] = []

    def leading() -> bool:
        checks.append(1)
        return len(checks) <= 2  # the round's own check and the first batch's

    run._leading = leading  # type: ignore[method-assign]
    run.tick()
    assert published == ids[:50]
    assert targets(cloud, rollout_id) == dict.fromkeys(ids[:50], "DEPLOYING") | dict.fromkeys(
        ids[50:], "PENDING"
    )


def test_a_split_batch_whose_first_half_committed_is_published_when_the_rest_stops(
    cloud: CloudContext,
) -> None:
    """A batch split in halves (one device in it cannot be moved) whose first half committed,
    then the lease is lost before the second half: the first half's devices are DEPLOYING in
    SQL and still reach the broker (nothing else would republish them before the keeper's
    renewal or the next reconnect; they would time out and count as failures)."""
    ids = devices(cloud, 50)
    stuck = ids[30]  # in the second half: the first half [0:25] commits first
    with cloud.database.session() as s:
        s.add(DeploymentEvent(device_id=stuck, rev=MAX_REV, rollout_id=None, model=MODEL,
                              version=1, state="ACTIVE", at=datetime.now(UTC)))  # fmt: skip
    rollout_id = start(cloud, 2, canary=50, min_failures=3, success_threshold=0.5)
    run, published = engine(cloud)
    checks: list[int] = []

    def leading() -> bool:
        checks.append(1)
        # the round's check, the whole batch's (rolled back: the stuck device), the first
        # half's (it commits); then the lease is gone before the second half
        return len(checks) <= 3

    run._leading = leading  # type: ignore[method-assign]
    run.tick()
    state = targets(cloud, rollout_id)
    committed = [d for d in ids if state[d] == "DEPLOYING"]
    assert committed == ids[:25]
    assert sorted(published) == committed


def test_a_batch_committed_unheard_is_published_though_every_retry_fails(
    cloud: CloudContext,
) -> None:
    """The second batch commits but the engine hears an error, and the database then refuses
    both retries: the round stops, yet that batch's devices, DEPLOYING in SQL, are published
    (nothing else would send them their documents before a renewal or a reconnect)."""
    ids = devices(cloud, 120)
    rollout_id = start(cloud, 2, canary=120)
    with _commit_heard_as_lost(cloud, "d075", then_refuse=True) as lost:
        run, published = engine(cloud)
        run.tick()
    assert lost == [1]
    state = targets(cloud, rollout_id)
    assert [d for d in ids if state[d] == "DEPLOYING"] == ids[:100]
    assert published == ids[:100]
