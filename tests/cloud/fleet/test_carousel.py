"""The chunk carousel: what one artifact's reel sends, in which order and how often (a fake
clock), and the broadcaster around it — paced by acknowledgements that come late, with
bounded memory, refusing what a device may not have, never ended by an error."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from cloud.artifacts.store import ArtifactStore
from cloud.fleet.carousel import Pacing, Reel
from cloud.fleet.chunks import MAX_INBOX, ChunkBroadcaster
from shared import topics
from shared.messages import ArtifactRequest
from tests.fleet_harness import wait_for

PACING = Pacing(pass_interval_s=1.0, settle_s=1.0, lone_settle_s=0.2, max_wait_s=5.0, grace_s=2.0)
SHA = "a" * 64


def _drain(reel: Reel, now: float) -> list[int]:
    """Everything the reel sends at ``now``, as the sender would take it, one by one."""
    sent = []
    while (index := reel.next_index(now, PACING)) is not None:
        reel.sent(index, now)
        sent.append(index)
    return sent


def test_the_wants_of_many_devices_are_one_set_sent_in_index_order() -> None:
    """Three devices ask for overlapping chunks: once joins have settled, each chunk wanted
    goes out once, in order; indices past the artifact are ignored."""
    reel = Reel(SHA, chunk_size=1024, chunks=6)
    reel.ask([4, 0, 2], 0.0, PACING, first=True)
    reel.ask([2, 3], 0.2, PACING, first=True)
    reel.ask([0, 99], 0.4, PACING, first=True)
    assert sorted(reel.wanted) == [0, 2, 3, 4]
    assert _drain(reel, 1.0) == []  # the last device joined 0.6 s ago
    assert _drain(reel, 1.4) == [0, 2, 3, 4]
    assert not reel.wanted
    assert reel.passes == 1


def test_a_device_joining_mid_pass_gets_the_rest_now_and_the_start_next_pass() -> None:
    """A device alone waits only a moment for its pass; at chunk 2 a second device asks for
    everything: it gets 3, 4, 5 in this pass, and 0, 1, 2 in the next one."""
    reel = Reel(SHA, chunk_size=1024, chunks=6)
    reel.ask(list(range(6)), 0.0, PACING, first=True)
    for _ in range(3):
        index = reel.next_index(1.0, PACING)
        assert index is not None
        reel.sent(index, 1.0)
    reel.ask(list(range(6)), 1.1, PACING, first=True)
    assert _drain(reel, 1.1) == [3, 4, 5]
    assert reel.passes == 1
    assert _drain(reel, 1.5) == []  # the last pass began less than pass_interval_s ago
    assert _drain(reel, 2.2) == [0, 1, 2]
    assert reel.passes == 2


def test_a_next_pass_waits_for_joins_to_settle_but_not_beyond_max_wait() -> None:
    """Devices keep joining every 0.5 s: the pass waits for them, but starts max_wait_s after
    it became due anyway."""
    reel = Reel(SHA, chunk_size=1024, chunks=4)
    reel.ask(list(range(4)), 0.0, PACING, first=True)
    started = None
    now = 0.0
    while now < 10 and started is None:
        reel.ask(list(range(4)), now, PACING, first=True)
        if _drain(reel, now):
            started = now
        now += 0.5
    assert started == pytest.approx(PACING.max_wait_s)


def test_a_chunk_nobody_wants_any_more_stops_being_sent() -> None:
    """A chunk sent is not sent again unless asked again; an ask never repeated within the
    time to live is dropped unsent."""
    reel = Reel(SHA, chunk_size=1024, chunks=4)
    reel.ask([0, 1], 0.0, PACING, first=True)
    assert _drain(reel, 1.0) == [0, 1]
    assert _drain(reel, 5.0) == []
    reel.ask([3], 6.0, PACING)
    assert reel.expire(older_than=6.5) == 1
    assert _drain(reel, 7.0) == []


def test_a_pass_longer_than_the_time_to_live_sends_its_tail() -> None:
    """50 devices ask for all 400 chunks at once and receive them in order, gaining chunk
    after chunk, so none asks again; the pass lasts 70 s (a chunk every 0.175 s) against a
    time to live of 60 s, expiry running every second as the broadcaster's does. Every chunk
    still goes out in that one pass. Before, the 66 chunks of its tail expired unsent."""
    ttl = 60.0
    reel = Reel(SHA, chunk_size=1024, chunks=400)
    for device in range(50):
        reel.ask(list(range(400)), 0.01 * device, PACING, first=True)
    now, expired_at, expired, sent = 0.0, 0.0, 0, []
    while now < 120:
        if now - expired_at >= 1.0:
            expired_at = now
            expired += reel.expire(now - ttl)
        index = reel.next_index(now, PACING)
        if index is None:
            now += 0.1
            continue
        reel.sent(index, now)
        sent.append(index)
        now += 0.175
    assert expired == 0
    assert sent == list(range(400))
    assert reel.passes == 1


def test_a_want_waiting_behind_a_long_pass_lives_until_the_next_one() -> None:
    """A device joins when the cursor is at chunk 100 of a pass that lasts 70 s: it gets the
    rest of this pass, and chunks 0..99 wait for the next — the time to live counts from the
    end of this pass, not from the ask. Once no pass is under way, a want nobody repeats
    within the time to live goes unsent."""
    ttl = 60.0
    reel = Reel(SHA, chunk_size=1024, chunks=400)
    reel.ask(list(range(400)), 0.0, PACING, first=True)
    now, sent = 1.0, []
    while len(sent) < 400:
        if len(sent) == 100:
            reel.ask(list(range(400)), now, PACING, first=True)
        assert reel.expire(now - ttl) == 0
        index = reel.next_index(now, PACING)
        assert index is not None
        reel.sent(index, now)
        sent.append(index)
        now += 0.175
    assert sent == list(range(400))
    assert reel.expire(now + 10.0 - ttl) == 0  # 10 s after the pass: 62 s after the ask
    assert sorted(reel.wanted) == list(range(100))
    assert reel.expire(now + 1.0) == 100  # no pass under way: the wants age from its end


def test_a_repeated_ask_right_after_the_chunk_left_is_not_a_want() -> None:
    """A device that heard nothing for a while asks again just as the chunk is on its way:
    within grace_s that is not a want (it would be sent twice); later it is, and a joining
    device's first ask always is."""
    reel = Reel(SHA, chunk_size=1024, chunks=2)
    reel.ask([0, 1], 0.0, PACING, first=True)
    assert _drain(reel, 1.0) == [0, 1]
    reel.ask([0], 2.0, PACING)
    assert not reel.wanted
    reel.ask([1], 2.0, PACING, first=True)
    assert list(reel.wanted) == [1]
    reel.ask([0], 3.5, PACING)
    assert sorted(reel.wanted) == [0, 1]


def test_an_ask_of_silence_waits_longer_than_one_that_shows_a_loss() -> None:
    """A thousand devices downloading; three ask again for chunks sent 3 s ago: one that only
    heard nothing for a while (passed_over False: its chunks may be queued at the broker) is
    not a want until silence_grace_s has passed; one whose later chunks arrived (passed_over
    True: lost) is; an older agent's (None) is taken as before, after grace_s."""
    pacing = Pacing(pass_interval_s=1.0, settle_s=1.0, lone_settle_s=0.2, max_wait_s=5.0,
                    grace_s=2.0, silence_grace_s=10.0, fan_out_s=0.01)  # fmt: skip
    reel = Reel(SHA, chunk_size=1024, chunks=4)
    for n in range(1000):
        reel.ask([0, 1, 2, 3], 0.0, pacing, first=True, device=f"d{n}")
    while (index := reel.next_index(1.0, pacing)) is not None:
        reel.sent(index, 1.0)
    assert reel.ask([0, 1], 4.0, pacing, passed_over=False, device="d1") == 0
    assert not reel.wanted
    assert reel.ask([1], 4.0, pacing, passed_over=True, device="d2") == 1
    assert reel.ask([2], 4.0, pacing) == 1
    assert sorted(reel.wanted) == [1, 2]
    assert reel.ask([0, 3], 11.5, pacing, passed_over=False, device="d1") == 2
    assert sorted(reel.wanted) == [0, 1, 2, 3]


def test_the_silence_grace_grows_with_the_devices_a_chunk_went_to() -> None:
    """Chunk 0 goes out to the 300 devices that asked before its pass: a silence ask 3.5 s
    later is not a want (the broker may still be handing it to 300 devices: 2 + 3 s of
    grace), one 5.5 s later is. Of those, 5 ask again during that pass; the next pass sends
    chunk 0 to them (and the one that asked): a silence ask 3 s later is a want (2.06 s)."""
    pacing = Pacing(pass_interval_s=1.0, settle_s=1.0, lone_settle_s=0.2, max_wait_s=5.0,
                    grace_s=2.0, silence_grace_s=10.0, fan_out_s=0.01)  # fmt: skip
    reel = Reel(SHA, chunk_size=1024, chunks=2)
    for n in range(300):
        reel.ask([0, 1], 0.0, pacing, first=True, device=f"d{n}")
    assert reel.next_index(2.0, pacing) == 0
    reel.sent(0, 2.0)
    assert reel.ask([0], 5.5, pacing, passed_over=False, device="d0") == 0
    assert reel.ask([0], 7.5, pacing, passed_over=False, device="d0") == 1
    for n in range(1, 6):
        reel.ask([0], 7.6, pacing, passed_over=True, device=f"d{n}")
    assert reel.next_index(8.0, pacing) == 1
    reel.sent(1, 8.0)
    assert reel.next_index(9.0, pacing) == 0
    reel.sent(0, 9.0)
    assert reel.ask([0], 12.0, pacing, passed_over=False, device="d1") == 1


# -- the broadcaster ---------------------------------------------------------------------


class LateAcks:
    """A broker link that acknowledges each publish only when the test says so."""

    def __init__(self) -> None:
        self.unacked: list[str] = []
        self.published: list[str] = []
        self.most_unacked = 0
        self.lock = threading.Lock()
        self.on_ack = lambda: None

    def publish(self, topic: str, _data: bytes) -> bool:
        with self.lock:
            self.unacked.append(topic)
            self.published.append(topic)
            self.most_unacked = max(self.most_unacked, len(self.unacked))
        return True

    def in_flight(self) -> int:
        with self.lock:
            return len(self.unacked)

    def ack_one(self) -> bool:
        with self.lock:
            if not self.unacked:
                return False
            self.unacked.pop(0)
        self.on_ack()
        return True


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts", chunk_size=1024)


def _broadcaster(store: ArtifactStore, link: LateAcks, **options: object) -> ChunkBroadcaster:
    broadcaster = ChunkBroadcaster(
        store, link.publish, chunk_size_of=lambda _sha: 1024, in_flight=link.in_flight,
        window_s=0.01, pacing=Pacing(settle_s=0.2, max_wait_s=1.0), **options,  # type: ignore[arg-type]
    )  # fmt: skip
    link.on_ack = broadcaster.acked
    return broadcaster


def test_no_more_than_max_in_flight_wait_for_the_broker(store: ArtifactStore) -> None:
    """20 chunks wanted, a broker that acks one every 20 ms: never more than 4 unacked, and
    all 20 go out once, in order."""
    artifact = store.put_bytes(bytes(range(256)) * 80)  # 20 chunks
    link = LateAcks()
    broadcaster = _broadcaster(store, link, max_in_flight=4)
    broadcaster.start()
    try:
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=list(range(20))))
        deadline = time.monotonic() + 20
        while len(link.published) < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
            link.ack_one()
        while link.ack_one():
            pass
    finally:
        broadcaster.stop()
    assert link.published == [topics.artifact_chunk(artifact.sha256, i) for i in range(20)]
    assert link.most_unacked == 4
    assert broadcaster.held_back > 0


def test_a_broker_that_never_acks_stops_the_carousel_not_the_memory(
    store: ArtifactStore,
) -> None:
    """Nothing is acknowledged: after max_in_flight chunks the sender waits, while a thousand
    devices ask for everything; what is kept stays one want per chunk, and the inbox of
    requests not yet checked is bounded."""
    artifact = store.put_bytes(b"x" * 1024 * 50)
    link = LateAcks()
    broadcaster = _broadcaster(store, link, max_in_flight=3)
    broadcaster.start()
    try:
        for _ in range(1000):
            broadcaster.request(
                ArtifactRequest(sha256=artifact.sha256, chunks=list(range(60)), first=True)
            )
        wait_for(lambda: broadcaster.requests == 1000, 20, "every request admitted")
        time.sleep(0.3)
        assert len(link.published) == 3
        # One want per chunk of the artifact at most (chunks 50..59 are past its end).
        assert 47 <= broadcaster.wanted <= 50
    finally:
        broadcaster.stop()
    overflowing = ChunkBroadcaster(store, link.publish, chunk_size_of=lambda _sha: 1024)
    request = ArtifactRequest(sha256=artifact.sha256, chunks=[0])
    for _ in range(MAX_INBOX + 10):
        overflowing.request(request, "dev")
    assert overflowing.overflow == 10


def test_a_request_outside_the_devices_desired_state_sends_nothing(
    store: ArtifactStore,
) -> None:
    """allowed() says no for one device: its request is refused and nothing is published;
    the allowed device's request is answered."""
    artifact = store.put_bytes(b"y" * 2048)
    link = LateAcks()
    broadcaster = _broadcaster(store, link)
    broadcaster.allowed = lambda asks: [device_id == "mine" for device_id, _sha in asks]
    broadcaster.start()
    try:
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[0, 1]), "stranger")
        wait_for(lambda: broadcaster.refused == 1, 10, "the refusal")
        time.sleep(0.1)
        assert link.published == []
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[1]), "mine")
        wait_for(lambda: link.published, 10, "the allowed chunk")
    finally:
        broadcaster.stop()
    assert link.published == [topics.artifact_chunk(artifact.sha256, 1)]


def test_an_artifact_gone_from_disk_is_an_error_and_the_carousel_goes_on(
    store: ArtifactStore,
) -> None:
    """The file of one artifact disappears: asking for it is logged as refused or failed and
    counted, the other artifact is served all the same."""
    gone = store.put_bytes(b"g" * 4096)
    kept = store.put_bytes(b"k" * 4096)
    link = LateAcks()
    broadcaster = _broadcaster(store, link)
    broadcaster.start()
    try:
        broadcaster.request(ArtifactRequest(sha256=gone.sha256, chunks=[0]))
        wait_for(lambda: link.published, 10, "the first chunk")
        link.ack_one()
        store.delete(gone.sha256)
        broadcaster.request(ArtifactRequest(sha256=gone.sha256, chunks=[1, 2]))
        broadcaster.request(ArtifactRequest(sha256=kept.sha256, chunks=[0, 1, 2, 3]))
        wait_for(lambda: len(link.published) == 5, 10, "the kept artifact")
        assert broadcaster.errors + broadcaster.refused >= 1
    finally:
        broadcaster.stop()
    assert link.published[1:] == [topics.artifact_chunk(kept.sha256, i) for i in range(4)]


def test_a_waves_requests_are_checked_together(store: ArtifactStore) -> None:
    """200 devices ask within one admission window: their rights are checked in one call
    (one registry read for all, not one each: at fleet scale those reads made the carousel
    see a wave join over tens of seconds), a device without the right is refused alone and
    one without an id is refused without being asked about."""
    artifact = store.put_bytes(b"w" * 4096)
    link = LateAcks()
    broadcaster = _broadcaster(store, link)
    broadcaster.window_s = 0.3
    calls: list[list[tuple[str, str]]] = []

    def allowed(asks: list[tuple[str, str]]) -> list[bool]:
        calls.append(list(asks))
        return [device_id != "d007" for device_id, _sha in asks]

    broadcaster.allowed = allowed
    broadcaster.start()
    try:
        for n in range(200):
            request = ArtifactRequest(sha256=artifact.sha256, chunks=[0, 1, 2, 3], first=True)
            broadcaster.request(request, f"d{n:03d}")
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[0]), None)
        wait_for(lambda: broadcaster.requests + broadcaster.refused == 201, 10, "the admission")
    finally:
        broadcaster.stop()
    assert len(calls) == 1
    assert calls[0] == [(f"d{n:03d}", artifact.sha256) for n in range(200)]
    assert (broadcaster.requests, broadcaster.refused) == (199, 2)


def test_requests_whose_check_failed_are_checked_again(store: ArtifactStore) -> None:
    """The rights check fails once (the registry away): the wave's requests, first asks
    among them, are not dropped but checked again a moment later and joined."""
    artifact = store.put_bytes(b"r" * 4096)
    link = LateAcks()
    broadcaster = _broadcaster(store, link)
    calls: list[int] = []

    def allowed(asks: list[tuple[str, str]]) -> list[bool]:
        calls.append(len(asks))
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("injected: registry away"))
        return [True] * len(asks)

    broadcaster.allowed = allowed
    broadcaster.start()
    try:
        for n in range(20):
            request = ArtifactRequest(sha256=artifact.sha256, chunks=[0, 1], first=True)
            broadcaster.request(request, f"d{n}")
        wait_for(lambda: broadcaster.requests == 20, 10, "the requests admitted")
    finally:
        broadcaster.stop()
    assert broadcaster.errors == 1
    assert calls[0] == 20
    assert sum(calls[1:]) == 20
    assert (broadcaster.refused, broadcaster.overflow) == (0, 0)


def test_a_request_whose_check_always_fails_does_not_hold_the_others_back(
    store: ArtifactStore,
) -> None:
    """Checking one device's request raises an unexpected error every time: the requests of
    that admission are dropped (their devices ask again), not put back for ever, so a
    request that comes after it is admitted."""
    artifact = store.put_bytes(b"q" * 4096)
    link = LateAcks()
    broadcaster = _broadcaster(store, link)
    broadcaster.window_s = 0.2

    def allowed(asks: list[tuple[str, str]]) -> list[bool]:
        if any(device_id == "bad" for device_id, _sha in asks):
            raise RuntimeError("injected: a bug in the check")
        return [True] * len(asks)

    broadcaster.allowed = allowed
    broadcaster.start()
    try:
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[0]), "bad")
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[0]), "good")
        wait_for(lambda: broadcaster.errors == 1, 10, "the failed check")
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[1]), "good")
        wait_for(lambda: broadcaster.requests == 1, 10, "the next request admitted")
    finally:
        broadcaster.stop()
    assert broadcaster.errors == 1
