"""The keeper when things go wrong: a broker that does not take a document, renewals that
keep failing, and the old Redis copy of the documents."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.fleet import keeper as keeper_module
from cloud.fleet.desired import stored_state
from cloud.fleet.keeper import _CLEARED_WHEN_DELETED, LEGACY_REDIS_KEY, DesiredStateKeeper
from cloud.registry import repository
from shared import topics
from shared.signing import verify_desired_state
from shared.topics import DeviceTopic
from tests.cloud.fleet.desired_support import (
    add_models,
    audit_of,
    enroll,
    flush_link,
    open_context,
    retained_desired,
    sign_deployment,
)
from tests.fleet_harness import Cloud, running_cloud, wait_for

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Broker:
    """A publish callable that refuses (as a full link queue does) until told to take."""

    def __init__(self) -> None:
        self.taking = threading.Event()
        self.taken: list[tuple[str, str]] = []
        self.refused = 0

    def __call__(self, topic: str, payload: str) -> bool:
        if not self.taking.is_set():
            self.refused += 1
            return False
        self.taken.append((topic, payload))
        return True


@pytest.fixture
def quick_context(tmp_path: Path, embedded: ServiceUrls) -> Iterator[CloudContext]:
    """Documents that live 30 days, and a keeper that looks every 0.1 s."""
    context = open_context(
        tmp_path, database_url=f"sqlite:///{tmp_path / 'r.db'}", mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url, desired_renewal_interval_s=0.1,
    )  # fmt: skip
    try:
        add_models(context, ("alpha",))
        yield context
    finally:
        context.close()


def test_a_renewal_the_broker_did_not_take_is_published_on_a_later_round(
    quick_context: CloudContext,
) -> None:
    """The renewed document is in SQL and its next renewal 20 days away: one the broker did
    not take must be tried again, not left to the old copy, which expires first."""
    context = quick_context
    device_id = enroll(context)
    broker = Broker()
    keeper = DesiredStateKeeper(context, broker)
    broker.taking.set()
    first = keeper.deploy(device_id=device_id, model="alpha", version=1)
    broker.taking.clear()
    with context.database.session() as s:
        repository.get_device(s, device_id=device_id).desired_renew_at = EPOCH
    keeper.start()
    try:
        wait_for(lambda: audit_of(context, device_id, "desired.renew"), 10, "the renewal")
        wait_for(lambda: broker.refused, 10, "the refused publish")
        broker.taking.set()
        wait_for(lambda: len(broker.taken) == 2, 10, "the renewed document published")
    finally:
        keeper.stop()
    public_key = context.signing_key.public_key()
    renewed = verify_desired_state(broker.taken[-1][1], public_key, device_id=device_id)
    assert renewed.rev == first.rev
    assert renewed.issued_at > first.issued_at
    assert keeper.pending() == set()


def test_a_deploy_the_broker_did_not_take_is_accepted_audited_and_sent_later(
    context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rev is committed, so the answer is 202 with published false (a 503 would invite
    a retry that signs another rev); the audit record is in the same transaction; the keeper
    hands the document to the broker once it takes messages again, under the same rev."""
    add_models(context, ("alpha",))
    with running_cloud(context) as cloud:
        keeper = cloud.fleet.desired
        keeper.pending_retry_s = 0.1
        real = keeper._publish
        refusing = threading.Event()
        refusing.set()
        monkeypatch.setattr(
            keeper, "_publish", lambda t, p: False if refusing.is_set() else real(t, p)
        )
        device_id, _ = cloud.enroll()
        with cloud.admin() as c:
            r = c.put(f"/v1/devices/{device_id}/deployments/alpha", json={"version": 2})
        assert r.status_code == 202, r.text
        assert (r.json()["rev"], r.json()["published"]) == (1, False)
        assert "do not repeat" in r.json()["note"]
        assert audit_of(context, device_id, "device.deploy") == [
            {"model": "alpha", "version": 2, "rev": 1, "rollout_id": None, "actor": "admin"}
        ]
        assert device_id in keeper.pending()

        refusing.clear()
        wait_for(lambda: not keeper.pending(), 10, "the document handed to the broker")
        flush_link(cloud.fleet, context.urls.mqtt_url)
        document = retained_desired(context.urls.mqtt_url, device_id)
        _clear(cloud, device_id)
    public_key = context.signing_key.public_key()
    assert verify_desired_state(document, public_key, device_id=device_id).rev == 1
    assert [e["rev"] for e in audit_of(context, device_id, "desired.sign")] == [1]


def _clear(cloud: Cloud, device_id: str) -> None:
    with cloud.admin() as c:
        assert c.delete(f"/v1/devices/{device_id}").status_code == 204
    flush_link(cloud.fleet, cloud.context.urls.mqtt_url)


def test_renewals_that_keep_failing_are_postponed_and_do_not_block_the_others(
    context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three rows name a version that no longer exists (renewal fails every time) and are
    due before a healthy one, with batches of two: each failure is postponed by a round, so
    the healthy row is renewed on the next pass instead of never."""
    monkeypatch.setattr(keeper_module, "RENEWAL_BATCH", 2)
    add_models(context, ("alpha",))
    broken = [enroll(context) for _ in range(3)]
    healthy = enroll(context)
    keeper = DesiredStateKeeper(context, lambda _t, _p: True)
    keeper.deploy(device_id=healthy, model="alpha", version=1)
    with context.database.session() as s:
        for minute, device_id in enumerate(broken):
            device = repository.get_device(s, device_id=device_id)
            device.desired = {"alpha": {"version_id": 999_999, "rollout_id": None}}
            device.desired_rev = 1
            device.desired_renew_at = EPOCH + timedelta(minutes=minute)
        repository.get_device(s, device_id=healthy).desired_renew_at = EPOCH + timedelta(hours=1)
    now = datetime.now(UTC)

    renewed = [keeper.renew_due(now=now) for _ in range(3)]

    assert renewed == [0, 1, 0]
    with context.database.session() as s:
        state = stored_state(repository.get_device(s, device_id=healthy))
        postponed = [repository.get_device(s, device_id=d).desired_renew_at for d in broken]
    assert state is not None
    assert state.issued_at == now
    later = now + timedelta(seconds=keeper.interval_s)
    assert [p.replace(tzinfo=UTC) if p and not p.tzinfo else p for p in postponed] == [later] * 3


def test_the_keeper_removes_the_old_redis_copy_of_the_documents(context: CloudContext) -> None:
    """Before SQL kept them, documents lived in one Redis hash that nothing reads now."""
    context.redis.hset(LEGACY_REDIS_KEY, "cam-1", "old signed document")
    keeper = DesiredStateKeeper(context, lambda _t, _p: True)
    keeper.start()
    keeper.stop()
    assert not context.redis.exists(LEGACY_REDIS_KEY)


def test_publish_many_hands_over_what_sql_says_and_keeps_what_was_refused(
    quick_context: CloudContext,
) -> None:
    """A batch of devices in one call, as one publish each would: a device's newest signed
    document, an empty desired topic for one without any, the three cleared topics of an id
    SQL no longer has; a broker that refuses leaves them all pending for the next round."""
    context = quick_context
    signed, bare = enroll(context), enroll(context)
    document = sign_deployment(context, signed, "alpha", 1)
    broker = Broker()
    keeper = DesiredStateKeeper(context, broker)
    broker.taking.set()
    assert keeper.publish_many([signed, bare, "gone-1", signed]) == 3
    assert broker.taken == [
        (topics.device_topic(signed, DeviceTopic.DESIRED), document),
        (topics.device_topic(bare, DeviceTopic.DESIRED), ""),
        *[(topics.device_topic("gone-1", kind), "") for kind in _CLEARED_WHEN_DELETED],
    ]
    assert keeper.pending() == set()
    broker.taking.clear()
    assert keeper.publish_many([signed, bare]) == 0
    assert keeper.pending() == {signed, bare}


def test_devices_whose_rows_could_not_be_read_are_published_on_a_later_round(
    quick_context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database drops the read of a batch just committed (publish_many) or of one
    device (publish): no exception reaches the rollout engine or the API, whose change is
    committed, and those devices are pending, so the next round sends their documents."""
    context = quick_context
    signed, other = enroll(context), enroll(context)
    document = sign_deployment(context, signed, "alpha", 1)
    broker = Broker()
    broker.taking.set()
    keeper = DesiredStateKeeper(context, broker)
    real = context.database.session

    def dropped() -> None:
        raise OperationalError("SELECT", {}, Exception("injected: connection lost"))

    monkeypatch.setattr(context.database, "session", dropped)
    assert keeper.publish_many([signed, other]) == 0
    assert keeper.publish(signed) is False
    assert keeper.pending() == {signed, other}
    assert broker.taken == []

    monkeypatch.setattr(context.database, "session", real)
    assert keeper.publish_pending() == 2
    assert keeper.pending() == set()
    assert (topics.device_topic(signed, DeviceTopic.DESIRED), document) in broker.taken


def test_a_round_stops_at_the_first_read_the_database_refuses(
    quick_context: CloudContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """200 devices pending; the database goes away: one round should find that out once,
    not open (and wait on) one session per pending device, logging a warning each."""
    context = quick_context
    ids = [enroll(context) for _ in range(200)]
    broker = Broker()
    keeper = DesiredStateKeeper(context, broker)
    keeper.publish_many(ids)  # refused by the broker: all pending
    assert keeper.pending() == set(ids)
    attempts: list[int] = []

    def dropped() -> None:
        attempts.append(1)
        raise OperationalError("SELECT", {}, Exception("injected: database away"))

    monkeypatch.setattr(context.database, "session", dropped)
    keeper.publish_pending()
    assert keeper.pending() == set(ids)
    assert len(attempts) <= 2, f"{len(attempts)} sessions opened in one round"


def test_a_republish_the_database_interrupted_is_done_again_next_round(
    quick_context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker reconnected (every document is due again) while the database is away:
    the round fails, and the next one, with the database back, gives the broker every
    document (the request to republish was dropped before the list could be read)."""
    context = quick_context
    device_id = enroll(context)
    document = sign_deployment(context, device_id, "alpha", 1)
    broker = Broker()
    broker.taking.set()
    keeper = DesiredStateKeeper(context, broker)
    keeper.request_republish()
    real = context.database.session

    def dropped() -> None:
        raise OperationalError("SELECT", {}, Exception("injected: database away"))

    monkeypatch.setattr(context.database, "session", dropped)
    with pytest.raises(OperationalError):
        keeper.upkeep()
    monkeypatch.setattr(context.database, "session", real)
    keeper.upkeep()
    assert (topics.device_topic(device_id, DeviceTopic.DESIRED), document) in broker.taken
