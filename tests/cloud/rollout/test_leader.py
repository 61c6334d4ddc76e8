"""Leadership of the rollout engine on a real Redis: the lease is renewed, lost and taken
again; a fencing counter that went backwards is raised above the registry's fences; a round
longer than the lease keeps it, and a round that loses it stops acting."""

from __future__ import annotations

import threading
import time

from sqlalchemy import update

from cloud.context import CloudContext
from cloud.registry.tables import Rollout
from cloud.rollout.engine import RolloutEngine
from cloud.rollout.leader import Leadership
from tests.cloud.rollout.support import devices, engine, rollout, start, targets


def test_the_lease_is_renewed_lost_and_taken_again(context: CloudContext) -> None:
    """A leads and renews; B waits. A stops renewing (paused), its lease expires, B takes it
    with a higher token; A learns it lost at its next renewal; A takes it back only once B
    releases it, again with a higher token."""
    a = Leadership(context.redis, ttl_s=1.0, identity="a")
    b = Leadership(context.redis, ttl_s=1.0, identity="b")
    assert a.hold() == 1
    assert b.hold() is None
    assert a.renew()
    assert a.hold() == 1  # renewing keeps the token
    time.sleep(1.1)  # A is paused past its lease
    assert b.hold() == 2
    assert b.leader() == "b"
    assert not a.renew()
    assert a.token is None
    assert a.hold() is None
    b.release()
    assert b.leader() is None
    assert a.hold() == 3


def test_a_lease_still_ours_without_a_token_is_taken_again_at_once(context: CloudContext) -> None:
    """An engine that dropped its token (Redis did not answer a renewal in time) while the
    lease is still its own takes it again at once, with a new token, rather than waiting
    for its own lease to expire; the lease and the token come together."""
    a = Leadership(context.redis, ttl_s=30.0, identity="a")
    assert a.hold() == 1
    a.token = None
    assert a.hold() == 2
    assert 0 < int(context.redis.pttl(a.key)) <= 30_000
    assert int(context.redis.get(a.fence_key) or 0) == 2


def test_refencing_never_takes_a_lease_that_is_not_ours(context: CloudContext) -> None:
    a = Leadership(context.redis, ttl_s=30.0, identity="a")
    b = Leadership(context.redis, ttl_s=30.0, identity="b")
    assert b.hold() == 1
    a.token = 1
    assert a.refence(above=10) is None
    assert a.token is None
    assert int(context.redis.get(a.fence_key) or 0) == 1
    assert b.refence(above=10) == 11


def test_a_fencing_counter_that_went_backwards_does_not_stall_the_engine(
    sqlite_cloud: CloudContext,
) -> None:
    """Redis restarted without its data (the embedded one keeps nothing on disk): the counter
    starts again below the fence the registry holds (4). The engine, which holds the lease,
    raises the counter above it and acts in the same round, instead of deposing itself for
    (4 - 1) lease periods."""
    context = sqlite_cloud
    (device,) = devices(context, 1)
    rollout_id = start(context, 2)
    with context.database.session() as s:
        s.execute(update(Rollout).where(Rollout.id == rollout_id).values(fence=4))
    context.redis.flushdb()
    run, published = engine(context, ttl_s=1.0)
    assert run.tick()
    assert run.leadership.token == 5
    assert targets(context, rollout_id) == {device: "DEPLOYING"}
    assert published == [device]


def test_a_round_longer_than_the_lease_keeps_it(sqlite_cloud: CloudContext) -> None:
    """A wave of 80 devices takes longer than the 3 s lease: the engine renews it while it
    works, so a rival that tries all along never takes it, and every device is sent once."""
    context = sqlite_cloud
    ids = devices(context, 80)
    rollout_id = start(context, 2, canary=80)

    run, _ = engine(context, ttl_s=3.0, publish=_slow_publish)
    run.release_after_s = 0.0  # each batch published once written: the publishes make it long
    started = time.monotonic()
    took = _tick_while_a_rival_tries(context, run)
    assert time.monotonic() - started > 3.0, "the round must outlast the lease to show this"
    assert took == []
    assert targets(context, rollout_id) == dict.fromkeys(ids, "DEPLOYING")


def test_a_round_that_loses_its_lease_stops_acting(sqlite_cloud: CloudContext) -> None:
    """Mid-round, the lease passes to another engine (this one was paused past it, say): at
    its next renewal the engine stops, leaving the rest of the wave to the new leader."""
    context = sqlite_cloud
    devices(context, 40)
    rollout_id = start(context, 2, canary=40)
    published: list[str] = []

    def publish(device_id: str) -> bool:
        published.append(device_id)
        if len(published) == 3:
            context.redis.set(run.leadership.key, "rival", px=30_000)
        time.sleep(0.05)
        return True

    run, _ = engine(context, ttl_s=0.6, publish=publish)
    run.batch_size = 5  # the lease is checked between batches: several of them in this wave
    run.release_after_s = 0.0  # each batch published once written: the publishes make it long
    assert not run.tick()
    assert run.leadership.token is None
    states = list(targets(context, rollout_id).values())
    assert states.count("PENDING") > 0
    assert states.count("DEPLOYING") == len(published) < 40
    assert rollout(context, rollout_id)[0] == "IN_PROGRESS"


def test_a_long_release_at_the_end_of_a_round_keeps_the_lease(sqlite_cloud: CloudContext) -> None:
    """test_a_round_longer_than_the_lease_keeps_it with the default release (the wave's
    documents go out together at the end): publishing 80 devices at 50 ms each outlasts the
    3 s lease; the engine must keep it while it releases, so the rival never takes it."""
    context = sqlite_cloud
    ids = devices(context, 80)
    rollout_id = start(context, 2, canary=80)

    run, _ = engine(context, ttl_s=3.0, publish=_slow_publish)
    assert run.release_after_s == 10.0
    took = _tick_while_a_rival_tries(context, run)
    assert targets(context, rollout_id) == dict.fromkeys(ids, "DEPLOYING")
    assert took == [], "a rival took the lease while the engine was releasing the wave"
    assert run.leadership.token is not None


def _slow_publish(_device_id: str) -> bool:
    time.sleep(0.05)
    return True


def _tick_while_a_rival_tries(context: CloudContext, run: RolloutEngine) -> list[int]:
    """One round of ``run`` (which must take place) while a rival engine with the same 3 s
    lease tries to take it every 50 ms; the tokens the rival got."""
    rival = Leadership(context.redis, ttl_s=3.0, identity="rival")
    took: list[int] = []
    done = threading.Event()

    def contend() -> None:
        while not done.is_set():
            token = rival.hold()
            if token is not None:
                took.append(token)
            time.sleep(0.05)

    thread = threading.Thread(target=contend)
    assert run.leadership.hold() is not None
    thread.start()
    try:
        assert run.tick()
    finally:
        done.set()
        thread.join(10)
    return took
