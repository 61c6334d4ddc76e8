"""Ingest batches on each registry backend: one transaction, acks only after the commit,
duplicates stored once, a database outage waited out, a deleted device never retried."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.fleet.ingest import Ingest
from cloud.fleet.watch import BacklogWatch
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent, Device
from cloud.settings import CloudSettings
from shared import topics
from shared.messages import DeploymentState, StatusEvent
from shared.mqtt_link import Inbound
from shared.retry import Backoff
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN
from tests.fleet_harness import wait_for


@pytest.fixture
def context(tmp_path: Path, database_url: str, embedded: ServiceUrls) -> Iterator[CloudContext]:
    settings = CloudSettings(
        data_dir=tmp_path / "cloud", admin_token=ADMIN_TOKEN, database_url=database_url
    )
    ctx = CloudContext.open(
        settings, ServiceUrls(database_url, "mqtt://127.0.0.1:9", embedded.redis_url)
    )
    ctx.redis.flushdb()
    yield ctx
    ctx.close()


class Acks:
    """Acknowledges for the link: records what was acked, and how many rows of its device
    were already committed at that moment."""

    def __init__(self, context: CloudContext) -> None:
        self.context = context
        self.acked: list[Inbound] = []
        self.committed_at_ack: list[int] = []

    def item(self, device_id: str, kind: DeviceTopic, payload: bytes | str) -> Inbound:
        data = payload.encode() if isinstance(payload, str) else payload
        return Inbound(topics.device_topic(device_id, kind), data, 1, time.monotonic(), self)

    def ack_many(self, items: Sequence[Inbound]) -> None:
        for item in items:
            self.acked.append(item)
            device_id = topics.parse(item.topic).device_id
            assert device_id is not None
            self.committed_at_ack.append(_events(self.context, device_id))


def _status(index: int = 0) -> str:
    return StatusEvent(
        rev=1, model="m", version=1, state=DeploymentState.DOWNLOADING,
        bytes_done=index, at=datetime.now(UTC),
    ).model_dump_json()  # fmt: skip


def _enroll(context: CloudContext, count: int) -> list[str]:
    ids = [f"dev-{uuid.uuid4().hex[:8]}" for _ in range(count)]
    with context.database.session() as s:
        for device_id in ids:
            repository.enroll_device(s, device_id=device_id)
    return ids


def _events(context: CloudContext, device_id: str) -> int:
    with context.database.session() as s:
        query = select(func.count()).select_from(DeploymentEvent)
        return int(s.scalar(query.where(DeploymentEvent.device_id == device_id)) or 0)


def _run(ingest: Ingest, items: list[Inbound], acks: Acks) -> None:
    """Queue everything first, so the worker takes it as one batch."""
    expected = len(acks.acked) + len(items)
    for item in items:
        ingest.submit(item)
    ingest.start()
    wait_for(lambda: len(acks.acked) == expected, 20, "every message acked")
    ingest.stop()


def test_a_batch_is_committed_before_any_of_it_is_acked(context: CloudContext) -> None:
    """Status, presence, reported and telemetry of three devices in one batch: every ack
    comes after the batch's commit, presence and reported keep the last per device, and
    the live view in Redis has the last of each kind."""
    devices = _enroll(context, 3)
    acks = Acks(context)
    items = [acks.item(d, DeviceTopic.STATUS, _status(i)) for i in range(10) for d in devices]
    first = devices[0]
    items += [
        acks.item(first, DeviceTopic.PRESENCE, b'{"state": "online"}'),
        acks.item(first, DeviceTopic.REPORTED, b'{"rev_applied": 1, "agent_version": "1"}'),
        acks.item(first, DeviceTopic.PRESENCE, b'{"state": "offline"}'),
        acks.item(first, DeviceTopic.REPORTED, b'{"rev_applied": 2, "agent_version": "1"}'),
        acks.item(first, DeviceTopic.TELEMETRY, b'{"window_s": 1, "at": "2026-01-01T00:00:00Z"}'),
        acks.item(first, DeviceTopic.TELEMETRY, b'{"window_s": 2, "at": "2026-01-01T00:00:01Z"}'),
    ]
    ingest = Ingest(context)
    _run(ingest, items, acks)
    assert ingest.batches == 1
    assert ingest.stored == {"status": 30, "presence": 2, "reported": 2, "telemetry": 2}
    assert all(count == 10 for count in acks.committed_at_ack)
    with context.database.session() as s:
        device = s.get(Device, first)
        assert device is not None
        assert (device.presence, device.reported["rev_applied"]) == ("offline", 2)
        assert device.last_seen_at is not None
    live = context.redis.hgetall(f"edgefleet:device:{first}")
    assert live[b"presence"] == b"offline"
    assert json.loads(live[b"reported"])["rev_applied"] == 2
    assert json.loads(live[b"last_status"])["bytes_done"] == 9
    assert json.loads(context.redis.get(f"edgefleet:telemetry:{first}") or b"")["window_s"] == 2
    assert context.redis.hget("edgefleet:telemetry:messages", first) == b"2"


def test_a_message_delivered_twice_is_stored_once(context: CloudContext) -> None:
    """The broker delivers a QoS 1 message again when our ack was lost: same device, same
    bytes, one row (both copies acked)."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    payload = _status(7)
    _run(Ingest(context), [acks.item(device_id, DeviceTopic.STATUS, payload)] * 2, acks)
    _run(Ingest(context), [acks.item(device_id, DeviceTopic.STATUS, payload)], acks)
    assert _events(context, device_id) == 1
    assert len(acks.acked) == 3


def test_a_database_that_cannot_take_the_batch_is_waited_for(
    context: CloudContext, caplog: pytest.LogCaptureFixture
) -> None:
    """While the events table is gone the batch stays unacknowledged and is retried with
    backoff (logged); once the table is back it is stored and acked, nothing lost."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    with context.database.engine.begin() as conn:
        conn.execute(text("ALTER TABLE deployment_events RENAME TO deployment_events_away"))
    ingest = Ingest(context, backoff=Backoff(base=0.02, cap=0.1))
    try:
        with caplog.at_level(logging.WARNING, "cloud.fleet.ingest"):
            for index in range(5):
                ingest.submit(acks.item(device_id, DeviceTopic.STATUS, _status(index)))
            ingest.start()
            wait_for(lambda: ingest.retries >= 3, 10, "retries")
        assert acks.acked == []
        assert "kept unacknowledged" in caplog.text
        assert ingest.oldest_age_s() > 0
    finally:
        with context.database.engine.begin() as conn:
            conn.execute(text("ALTER TABLE deployment_events_away RENAME TO deployment_events"))
    wait_for(lambda: len(acks.acked) == 5, 10, "the batch stored after the outage")
    ingest.stop()
    assert _events(context, device_id) == 5
    assert ingest.dropped == {}


def test_a_deleted_device_is_dropped_not_retried_forever(context: CloudContext) -> None:
    """A device deleted after its first report (still in the known-device cache): its next
    report fails the foreign key, is dropped and acked; the other device's report is stored."""
    gone, kept = _enroll(context, 2)
    acks = Acks(context)
    ingest = Ingest(context)
    ingest.start()
    ingest.submit(acks.item(gone, DeviceTopic.STATUS, _status(0)))
    wait_for(lambda: len(acks.acked) == 1, 10, "the first report")
    with context.database.session() as s:
        repository.delete_device(s, device_id=gone)
    ingest.submit(acks.item(gone, DeviceTopic.STATUS, _status(1)))
    ingest.submit(acks.item(kept, DeviceTopic.STATUS, _status(1)))
    wait_for(lambda: len(acks.acked) == 3, 10, "both later reports acked")
    ingest.stop()
    assert ingest.dropped == {"unknown_device": 1}
    assert _events(context, kept) == 1


def test_malformed_and_unknown_messages_are_dropped_and_acked(context: CloudContext) -> None:
    """Broken JSON, a newer major schema, an empty status and a stranger's report are each
    acked and counted by reason; the good report among them is stored."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    newer = json.loads(_status()) | {"schema_version": 2}
    items = [
        acks.item(device_id, DeviceTopic.STATUS, b"{not json"),
        acks.item(device_id, DeviceTopic.STATUS, json.dumps(newer)),
        acks.item(device_id, DeviceTopic.STATUS, b""),
        acks.item("stranger", DeviceTopic.STATUS, _status()),
        acks.item(device_id, DeviceTopic.PRESENCE, b""),  # a cleared retained topic
        acks.item(device_id, DeviceTopic.STATUS, _status()),
    ]
    ingest = Ingest(context)
    _run(ingest, items, acks)
    assert ingest.dropped == {"malformed": 3, "unknown_device": 1}
    assert _events(context, device_id) == 1


def test_a_growing_backlog_is_a_warning_and_its_end_a_note(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Half the queue full, or a message waiting 5 s, warns (at most every 30 s); the
    warning is repeated while it lasts, and the end of it is logged once."""
    now = [0.0]
    watch = BacklogWatch(capacity=100, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "cloud.fleet.watch"):
        watch.check(10, 0.1)
        watch.check(60, 0.1)
        now[0] = 10.0
        watch.check(70, 6.0)
        now[0] = 31.0
        watch.check(10, 6.0)
        now[0] = 32.0
        watch.check(0, 0.0)
    assert watch.warnings == 2
    assert caplog.text.count("ingest backlog:") == 2
    assert "ingest backlog cleared after 32 s" in caplog.text


def test_one_value_the_database_refuses_costs_only_that_message(context: CloudContext) -> None:
    """Twenty good statuses and one whose reason holds a NUL byte (PostgreSQL refuses such
    text; SQLite takes it), in one batch: the batch is split until the refused one is found,
    so only it is dropped; every message is acked exactly once."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    bad = json.loads(_status(99))
    bad["reason"] = "nul\x00byte"
    items = [acks.item(device_id, DeviceTopic.STATUS, _status(i)) for i in range(20)]
    items.insert(7, acks.item(device_id, DeviceTopic.STATUS, json.dumps(bad)))
    ingest = Ingest(context)
    _run(ingest, items, acks)
    refuses_nul = context.database.engine.dialect.name == "postgresql"
    assert _events(context, device_id) == (20 if refuses_nul else 21)
    assert ingest.dropped == ({"unstorable": 1} if refuses_nul else {})
    assert len({id(i) for i in acks.acked}) == len(acks.acked) == 21


def test_numbers_past_the_columns_are_malformed_not_a_lost_batch(context: CloudContext) -> None:
    """A status with rev 10**20 (or byte counts past int8) among good ones is refused as
    malformed when read; the good ones are stored (before, the whole batch was dropped)."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    huge_rev = json.loads(_status(1)) | {"rev": 10**20}
    huge_bytes = json.loads(_status(2)) | {"bytes_done": 2**63}
    items = [acks.item(device_id, DeviceTopic.STATUS, _status(i)) for i in range(5)]
    items += [
        acks.item(device_id, DeviceTopic.STATUS, json.dumps(huge_rev)),
        acks.item(device_id, DeviceTopic.STATUS, json.dumps(huge_bytes)),
    ]
    ingest = Ingest(context)
    _run(ingest, items, acks)
    assert _events(context, device_id) == 5
    assert ingest.dropped == {"malformed": 2}


def test_a_full_queue_drops_qos0_at_once_and_holds_qos1(context: CloudContext) -> None:
    """Capacity two, worker not started: a third QoS 0 telemetry window is dropped (counted)
    without waiting; a QoS 1 status waits for room and is stored once the worker runs."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    ingest = Ingest(context, capacity=2)
    window = '{"window_s": 1, "at": "2026-12-04T12:00:00Z"}'
    for _ in range(3):
        item = acks.item(device_id, DeviceTopic.TELEMETRY, window)
        ingest.submit(Inbound(item.topic, item.payload, 0, item.received_at, acks))
    assert ingest.dropped == {"overflow": 1}
    waiting = threading.Thread(
        target=ingest.submit, args=(acks.item(device_id, DeviceTopic.STATUS, _status(1)),)
    )
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive(), "a QoS 1 message waits for room"
    ingest.start()
    waiting.join(10)
    wait_for(lambda: _events(context, device_id) == 1, 10, "the status stored")
    ingest.stop()


def test_an_oversized_payload_is_refused_before_it_takes_room(context: CloudContext) -> None:
    """A 1 MiB message is dropped (and acked) on arrival: it never enters the queue, and the
    queue's byte bound keeps a burst of large ones from filling memory."""
    (device_id,) = _enroll(context, 1)
    acks = Acks(context)
    ingest = Ingest(context, max_bytes=4096)
    ingest.submit(acks.item(device_id, DeviceTopic.TELEMETRY, b"x" * (1024 * 1024)))
    assert ingest.snapshot().depth == 0
    assert ingest.dropped == {"oversize": 1}
    assert len(acks.acked) == 1


def test_presence_of_a_deleted_device_is_dropped_not_stored(context: CloudContext) -> None:
    """A device deleted after its first report: its later presence and reported state are
    dropped as unknown (not counted stored), and no live view is made for it in Redis."""
    gone, kept = _enroll(context, 2)
    acks = Acks(context)
    ingest = Ingest(context)
    ingest.start()
    ingest.submit(acks.item(gone, DeviceTopic.STATUS, _status(0)))
    wait_for(lambda: len(acks.acked) == 1, 10, "the first report")
    with context.database.session() as s:
        repository.delete_device(s, device_id=gone)
    context.redis.delete(f"edgefleet:device:{gone}")
    ingest.submit(acks.item(gone, DeviceTopic.PRESENCE, b'{"state": "online"}'))
    ingest.submit(acks.item(kept, DeviceTopic.PRESENCE, b'{"state": "online"}'))
    wait_for(lambda: len(acks.acked) == 3, 10, "both presences acked")
    ingest.stop()
    assert ingest.dropped == {"unknown_device": 1}
    assert not context.redis.exists(f"edgefleet:device:{gone}")
    with context.database.session() as s:
        device = s.get(Device, kept)
        assert device is not None
        assert device.presence == "online"
