"""Ingest of what devices say (status, presence, reported state, telemetry), off the MQTT
network thread: a bounded queue, one worker, one transaction per batch, and each QoS 1
message acknowledged only once its batch is committed (DESIGN.md §3, the cloud's session)."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import BaseModel
from sqlalchemy import Insert, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from cloud.context import CloudContext
from cloud.fleet.watch import BacklogWatch, Throttle
from cloud.history.rollup import HistoryWriter
from cloud.registry.tables import DeploymentEvent, Device
from shared import topics
from shared.errors import ProtocolError
from shared.messages import Presence, ReportedState, StatusEvent, Telemetry, decode
from shared.mqtt_link import Inbound, ack_all
from shared.retry import Backoff
from shared.topics import DeviceTopic

__all__ = ["KINDS", "MAX_PAYLOAD", "TELEMETRY_TTL_S", "WINDOWS_SEEN_S", "Ingest", "IngestSnapshot"]

_LOGGER = logging.getLogger(__name__)

KINDS: dict[DeviceTopic, type[BaseModel]] = {
    DeviceTopic.STATUS: StatusEvent,
    DeviceTopic.PRESENCE: Presence,
    DeviceTopic.REPORTED: ReportedState,
    DeviceTopic.TELEMETRY: Telemetry,
}
# What one report may weigh, checked before it is decoded: a status or telemetry window is
# a few hundred bytes; the bounds leave room for growth, none for a flood of keys.
MAX_PAYLOAD: dict[DeviceTopic, int] = {
    DeviceTopic.STATUS: 8 * 1024,
    DeviceTopic.PRESENCE: 1024,
    DeviceTopic.REPORTED: 64 * 1024,
    DeviceTopic.TELEMETRY: 32 * 1024,
}
_LARGEST = max(MAX_PAYLOAD.values())
TELEMETRY_TTL_S = 3600
# Errors about the data (a value out of range, a device deleted meanwhile): the batch is split
# to find the message the database refuses. Any other database error (down, restarting,
# locked, a table missing mid-migration) is not one message's fault: wait it out.
_REFUSED = (IntegrityError, DataError, OverflowError, ValueError, TypeError)
_TRANSIENT = SQLAlchemyError
# A batch's live view in one Redis command: redis-py spends ~10 µs of Python on every command
# of a pipeline, and a batch has one or two per device. ARGV[1] is the telemetry TTL, ARGV[2]
# now (s), ARGV[3] how long a telemetry window is remembered, then operations: h key field
# value (HSET) | t key value (SET with the TTL) | w device n keys: n telemetry windows of the
# device, counted (HINCRBY of KEYS[1]) and added (ZADD NX) to its set of windows seen, scored
# by now, those older than ARGV[3] dropped; ``keys`` is their identities, _WINDOW_KEY_LEN
# characters each, in one argument (redis-py packs each argument in Python, at a cost).
# Returns, for each window of the w operations in order, 1 if no replica had seen it, else 0.
_LIVE_VIEW = """
local i = 4
local fresh = {}
while i <= #ARGV do
  local op = ARGV[i]
  if op == 'w' then
    local device, n, keys = ARGV[i + 1], tonumber(ARGV[i + 2]), ARGV[i + 3]
    local seen = 'edgefleet:telemetry:seen:' .. device
    local size = #keys / n
    redis.call('HINCRBY', KEYS[1], device, n)
    for j = 0, n - 1 do
      local key = string.sub(keys, j * size + 1, (j + 1) * size)
      fresh[#fresh + 1] = redis.call('ZADD', seen, 'NX', ARGV[2], key)
    end
    redis.call('ZREMRANGEBYSCORE', seen, '-inf', tonumber(ARGV[2]) - tonumber(ARGV[3]))
    redis.call('EXPIRE', seen, ARGV[3])
    i = i + 4
  elseif op == 'h' then
    redis.call('HSET', ARGV[i + 1], ARGV[i + 2], ARGV[i + 3])
    i = i + 4
  else
    redis.call('SET', ARGV[i + 1], ARGV[i + 2], 'EX', ARGV[1])
    i = i + 3
  end
end
return fresh
"""
_TELEMETRY_COUNTS = "edgefleet:telemetry:messages"
# How long the windows a device sent are remembered, so that a window that several replicas
# ingest (each has its own subscription, or the broker delivers it twice) is summed into the
# history once: the longest that two replicas' copies of one message can arrive apart.
WINDOWS_SEEN_S = 3600
_WINDOW_KEY_LEN = 24
_EVENTS: Table = DeploymentEvent.__table__  # type: ignore[assignment]
_DEVICES: Table = Device.__table__  # type: ignore[assignment]


class _Gone(Exception):
    """Devices in the batch that the registry no longer has."""

    def __init__(self, device_ids: set[str]) -> None:
        super().__init__(f"{len(device_ids)} devices gone")
        self.device_ids = device_ids


@dataclass(slots=True)
class _Entry:
    item: Inbound
    kind: DeviceTopic
    device_id: str
    message: Any  # the decoded KINDS[kind]; None for an empty (retained-clear) payload


@dataclass(frozen=True, slots=True)
class IngestSnapshot:
    """Counters and backlog at one instant (for /metrics and the log)."""

    depth: int
    capacity: int
    oldest_age_s: float
    received: int
    stored: dict[str, int]
    dropped: dict[str, int]
    batches: int
    retries: int
    redis_errors: int
    blocked: int
    windows_repeated: int  # telemetry windows another replica (or an earlier copy) had summed


class Ingest:
    """Queue + worker. :meth:`submit` runs on the network thread. While the queue is full
    (in messages or bytes) a QoS 1 message waits for room: unacknowledged messages then hold
    the broker's inflight window (backpressure) and the broker queues the rest for our
    session, so none is lost. A QoS 0 message (telemetry) is dropped and counted instead:
    the broker keeps none for us, and blocking the network thread for it would stall our
    keepalive, our acks and every publish."""

    def __init__(
        self,
        context: CloudContext,
        *,
        capacity: int = 20_000,
        max_batch: int = 2_000,
        max_bytes: int = 64 * 1024 * 1024,
        backoff: Backoff | None = None,
        history: HistoryWriter | None = None,
    ) -> None:
        self.context = context
        self.history = history  # telemetry summed per minute into SQL (cloud.history)
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.max_batch = max_batch
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.backlog = BacklogWatch(capacity)
        self.stored: dict[str, int] = defaultdict(int)
        self.dropped: dict[str, int] = defaultdict(int)
        self.received = self.batches = self.retries = self.redis_errors = self.blocked = 0
        self.windows_repeated = 0
        self._queue: queue.Queue[Inbound] = queue.Queue(capacity)
        self._bytes = 0  # payload bytes queued, under _bytes_lock
        self._bytes_lock = threading.Lock()
        # Items of the batch at hand already acked (dropped or stored): acking one twice
        # could ack a later message the broker gave the same packet id.
        self._acked: set[int] = set()
        self._known: set[str] = set()
        self._insert_events = _event_insert(context.database.engine.dialect.name)
        self._live_view = context.redis.register_script(_LIVE_VIEW)
        self._busy_since: float | None = None
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._throttle = Throttle()
        self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)

    # -- the interface -----------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Store (and ack) what is queued, then stop; what cannot be stored in ``timeout``
        stays unacknowledged, and the broker delivers it again to our next session."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            self._abort.set()
            self._thread.join(5)

    def submit(self, item: Inbound) -> None:
        if self._closing.is_set():
            return  # not acked: the broker keeps it for our next session
        self.received += 1
        size = len(item.payload)
        if size > _LARGEST:
            # Refused here, before it takes room: no report of any kind is this large.
            self._drop(item, "oversize", f"{item.topic}: {size} bytes, at most {_LARGEST}")
            return
        started: float | None = None
        while not self._closing.is_set():
            if self._offer(item, size):
                return
            if item.qos == 0:
                self.dropped["overflow"] += 1
                if (held := self._throttle.allow("overflow")) is not None:
                    _LOGGER.warning(
                        "ingest queue full: QoS 0 message on %s dropped%s", item.topic, _held(held)
                    )
                return
            now = time.monotonic()
            if started is None:
                started = now
                self.blocked += 1
            elif now - started > 5 and self._throttle.allow("blocked") is not None:
                _LOGGER.warning(
                    "ingest queue full for %.0f s: the broker holds new messages", now - started
                )
            time.sleep(0.005)

    def _offer(self, item: Inbound, size: int) -> bool:
        with self._bytes_lock:
            if self._bytes and self._bytes + size > self.max_bytes:
                return False
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                return False
            self._bytes += size
            return True

    def _take(self, timeout: float | None) -> Inbound:
        item = self._queue.get(timeout=timeout) if timeout else self._queue.get_nowait()
        with self._bytes_lock:
            self._bytes -= len(item.payload)
        return item

    def oldest_age_s(self) -> float:
        now = time.monotonic()
        with self._queue.mutex:
            head = self._queue.queue[0].received_at if self._queue.queue else None
        busy = self._busy_since
        starts = [t for t in (head, busy) if t is not None]
        return now - min(starts) if starts else 0.0

    def snapshot(self) -> IngestSnapshot:
        return IngestSnapshot(
            depth=self._queue.qsize(), capacity=self.capacity, oldest_age_s=self.oldest_age_s(),
            received=self.received, stored=dict(self.stored), dropped=dict(self.dropped),
            batches=self.batches, retries=self.retries, redis_errors=self.redis_errors,
            blocked=self.blocked, windows_repeated=self.windows_repeated,
        )  # fmt: skip

    # -- the worker ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                first = self._take(0.5)
            except queue.Empty:
                self.backlog.check(0, self.oldest_age_s())
                if self._closing.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._take(None))
                except queue.Empty:
                    break
            self._busy_since = first.received_at
            self._acked.clear()
            try:
                self._process(batch)
            except Exception:
                # A bug, not the data or the database: drop what is left, keep ingesting.
                _LOGGER.exception("ingest failed on a batch of %d; dropped", len(batch))
                for item in batch:
                    if id(item) not in self._acked:
                        self._drop(item, "error", None)
            finally:
                self._busy_since = None
            self.backlog.check(self._queue.qsize(), self.oldest_age_s())
            if self._abort.is_set():
                return

    def _process(self, batch: list[Inbound]) -> None:
        entries = [entry for item in batch if (entry := self._parse(item)) is not None]
        if entries:
            self._store(entries)
        self.batches += 1

    def _parse(self, item: Inbound) -> _Entry | None:
        try:
            parsed = topics.parse(item.topic)
            kind, device_id = parsed.kind, parsed.device_id
            if kind not in KINDS or kind is None or device_id is None:
                raise ProtocolError(f"not a topic the cloud ingests: {item.topic!r}")
            cls = KINDS[kind]
            if len(item.payload) > MAX_PAYLOAD[kind]:
                self._drop(
                    item, "oversize",
                    f"{item.topic}: {len(item.payload)} bytes, at most {MAX_PAYLOAD[kind]}",
                )  # fmt: skip
                return None
            if not item.payload and cls in (StatusEvent, Telemetry):
                raise ProtocolError("empty payload")
            message = decode(cls, item.payload) if item.payload else None
        except ProtocolError as exc:
            self._drop(item, "malformed", f"{item.topic}: {exc.message}")
            return None
        return _Entry(item, kind, device_id, message)

    def _known_only(self, entries: list[_Entry]) -> list[_Entry]:
        """Messages from devices the registry does not know are dropped (one query per miss)."""
        missing = {e.device_id for e in entries} - self._known
        if missing:
            with self.context.database.session() as s:
                self._known.update(s.scalars(select(Device.id).where(Device.id.in_(missing))))
        kept = []
        for entry in entries:
            if entry.device_id in self._known:
                kept.append(entry)
            else:
                self._drop(entry.item, "unknown_device", f"{entry.item.topic}: not enrolled")
        return kept

    def _store(self, entries: list[_Entry]) -> None:
        """Commit, update the live view, ack. A database that is unreachable is waited for
        (the batch stays unacknowledged); a batch the database refuses is split in halves
        until the message it refuses is found and dropped (a device deleted since we cached
        it is dropped as unknown once the registry is read again)."""
        attempt = 0
        while True:
            try:
                entries = self._known_only(entries)
                if entries:
                    self._commit(entries)
                break
            except _Gone as gone:
                self._known -= gone.device_ids
                continue  # the retry reads the registry again and drops them
            except _REFUSED as exc:
                if isinstance(exc, IntegrityError):
                    self._known.clear()  # a device deleted meanwhile: read them again
                if len(entries) == 1:
                    detail = getattr(exc, "orig", None) or exc
                    self._drop(entries[0].item, "unstorable", f"{entries[0].item.topic}: {detail}")
                    return
                half = len(entries) // 2
                for part in (entries[:half], entries[half:]):
                    if not self._abort.is_set():
                        self._store(part)
                return
            except _TRANSIENT as exc:
                self.retries += 1
                delay = self.backoff.delay(attempt)
                attempt += 1
                if (held := self._throttle.allow("db")) is not None:
                    _LOGGER.warning(
                        "ingest: database error (%s); batch of %d kept unacknowledged, retry "
                        "in %.1f s%s", type(exc).__name__, len(entries), delay, _held(held),
                    )  # fmt: skip
                if self._abort.wait(delay):
                    return
        if not entries:
            return
        fresh = self._publish_live(entries)
        if self.history is not None:
            self.history.add((e.device_id, e.message) for e in fresh)
        items = [entry.item for entry in entries]
        ack_all(items)
        self._acked.update(id(item) for item in items)
        for entry in entries:
            self.stored[entry.kind.value] += 1

    def _commit(self, entries: list[_Entry]) -> None:
        now = datetime.now(UTC)
        rows: list[dict[str, Any]] = []
        touched: set[str] = set()
        presence: dict[str, str] = {}
        reported: dict[str, dict[str, Any]] = {}
        for entry in entries:
            message, device_id = entry.message, entry.device_id
            if entry.kind is DeviceTopic.STATUS:
                rows.append(_event_row(device_id, message, entry.item.payload, now))
            elif entry.kind is DeviceTopic.PRESENCE and message is not None:
                presence[device_id] = message.state.value
            elif entry.kind is DeviceTopic.REPORTED and message is not None:
                reported[device_id] = message.model_dump(mode="json")
            else:
                continue
            touched.add(device_id)
        if not touched:
            return  # telemetry (Redis only) and cleared retained topics
        by_state: dict[str, list[str]] = defaultdict(list)
        for device_id, state in sorted(presence.items()):
            by_state[state].append(device_id)
        with self.context.database.session() as s:
            found = set(
                s.scalars(
                    update(_DEVICES)
                    .where(_DEVICES.c.id.in_(sorted(touched)))
                    .values(last_seen_at=now)
                    .returning(_DEVICES.c.id)
                )
            )
            if found != touched:
                # Deleted since we cached them: undo, and let _store drop their reports.
                raise _Gone(touched - found)
            for state, device_ids in by_state.items():
                s.execute(
                    update(_DEVICES).where(_DEVICES.c.id.in_(device_ids)).values(presence=state)
                )
            if reported:
                s.execute(
                    update(_DEVICES)
                    .where(_DEVICES.c.id == bindparam("b_id"))
                    .values(reported=bindparam("b_reported")),
                    [{"b_id": d, "b_reported": r} for d, r in sorted(reported.items())],
                )
            if rows:
                s.execute(self._insert_events, rows)

    def _publish_live(self, entries: list[_Entry]) -> list[_Entry]:
        """The live view in Redis: the last of each kind per device, in one round trip. Returns
        the telemetry windows no replica had seen before (all of them without Redis: counted
        twice if another replica ingests them too, rather than lost when it does not)."""
        last: dict[tuple[str, DeviceTopic], _Entry] = {}
        windows: dict[str, list[_Entry]] = defaultdict(list)
        for entry in entries:
            if entry.message is not None:
                last[(entry.device_id, entry.kind)] = entry
            if entry.kind is DeviceTopic.TELEMETRY:  # never empty (_parse refuses that)
                windows[entry.device_id].append(entry)
        seen = datetime.now(UTC).isoformat()
        args: list[str | int | float] = [TELEMETRY_TTL_S, time.time(), WINDOWS_SEEN_S]
        ordered: list[_Entry] = []
        for device_id, sent in windows.items():
            keys = "".join([_window_key(entry.item.payload) for entry in sent])
            args += ("w", device_id, len(sent), keys)
            ordered += sent
        for (device_id, kind), entry in last.items():
            key = f"edgefleet:device:{device_id}"
            if kind is DeviceTopic.STATUS:
                args += ("h", key, "last_status", entry.message.model_dump_json())
            elif kind is DeviceTopic.PRESENCE:
                args += ("h", key, "presence", entry.message.state.value)
                args += ("h", key, "seen", seen)
            elif kind is DeviceTopic.REPORTED:
                args += ("h", key, "reported", entry.message.model_dump_json())
            else:
                json = entry.message.model_dump_json()
                args += ("t", f"edgefleet:telemetry:{device_id}", json)
        try:
            fresh = self._live_view(keys=[_TELEMETRY_COUNTS], args=args)
        except redis.RedisError as exc:
            # SQL holds the history; the live view catches up with the next message.
            self.redis_errors += 1
            if (held := self._throttle.allow("redis")) is not None:
                _LOGGER.warning("ingest: live view not updated: %s%s", exc, _held(held))
            return ordered
        repeated = len(ordered) - sum(map(int, fresh))
        self.windows_repeated += repeated
        return [entry for entry, new in zip(ordered, fresh, strict=True) if int(new)]

    def _drop(self, item: Inbound, reason: str, detail: str | None) -> None:
        """A message that can never be stored is acked (or it would come back forever)."""
        item.ack()
        self._acked.add(id(item))
        self.dropped[reason] += 1
        if detail is not None and (held := self._throttle.allow(reason)) is not None:
            _LOGGER.warning("ingest dropped a message (%s): %s%s", reason, detail, _held(held))


def _held(count: int) -> str:
    return f" ({count} more like it not logged)" if count else ""


def _window_key(payload: bytes) -> str:
    """A telemetry window's identity among its device's (_WINDOW_KEY_LEN characters): the
    same bytes are the same window (an agent dates each window: two never have the same)."""
    return hashlib.blake2b(payload, digest_size=_WINDOW_KEY_LEN // 2).hexdigest()


def _event_row(device_id: str, event: StatusEvent, payload: bytes, now: datetime) -> dict[str, Any]:
    return {
        "device_id": device_id, "rev": event.rev, "rollout_id": event.rollout_id,
        "model": event.model, "version": event.version, "state": event.state.value,
        "reason": event.reason, "bytes_done": event.bytes_done,
        "bytes_total": event.bytes_total, "at": event.at, "received_at": now,
        # The same bytes from the same device are the same event: a QoS 1 message
        # delivered again (its ack was lost) is stored once.
        "dedup_key": hashlib.blake2b(
            device_id.encode() + b"\0" + payload, digest_size=16
        ).hexdigest(),
    }  # fmt: skip


def _event_insert(dialect: str) -> Insert:
    if dialect == "postgresql":
        return postgresql.insert(_EVENTS).on_conflict_do_nothing(index_elements=["dedup_key"])
    if dialect == "sqlite":
        return sqlite.insert(_EVENTS).on_conflict_do_nothing(index_elements=["dedup_key"])
    return insert(_EVENTS)
