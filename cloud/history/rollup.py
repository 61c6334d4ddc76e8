"""Telemetry windows summed per (device, minute) in memory, written to ``telemetry_minutes``
every few seconds by a thread of its own (an upsert that adds), and old minutes deleted.

Why in memory first: the ingest stores ~13,000 telemetry windows a second (B5) and must not
slow down; a fleet of N devices costs at most ~N row upserts per flush whatever the message
rate. Telemetry is QoS 0 (the broker keeps none of it for us), so what a hard crash loses is
at most the last flush interval of history, as the live view in Redis would; a clean stop
flushes. Several fleet replicas each add their share: the upsert adds, never replaces. A
window that more than one replica receives (no shared subscription) reaches only one writer:
the ingest gives a writer only the windows Redis had not seen (cloud.fleet.ingest)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from operator import add
from typing import Any

from sqlalchemy import Insert, Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from cloud.history.buckets import BOUNDS_MS, BUCKETS, targets
from cloud.registry.database import Database
from cloud.registry.tables import Device, TelemetryMinute
from shared.messages import Telemetry

__all__ = ["SUMS", "HistoryWriter", "RollupStats", "minute_of"]

_LOGGER = logging.getLogger(__name__)
_TABLE: Table = TelemetryMinute.__table__  # type: ignore[assignment]
# Summed columns, in the order a pending row keeps them (after ``windows``).
COUNTS = (
    "requests", "answers_cloud", "degraded", "errors",
    "rows_total", "rows_hard", "rows_cloud", "rows_degraded",
)  # fmt: skip
LATENCY = tuple(f"lat_{i:02d}" for i in range(BUCKETS))
SUMS = ("windows", *COUNTS, *LATENCY)
_LATENCY_AT = 1 + len(COUNTS)
# Where an agent's histogram lands: its buckets are a prefix of ours, then its +inf.
_AGENT_TARGETS = [*range(len(BOUNDS_MS) - 1), BUCKETS - 1]
_ZEROS = (0,) * len(SUMS)
# A window's count past this is a device lying (a billion rows in one window): clamped, so
# that no device can push a minute's sum past what a BIGINT holds and lose the whole flush.
_MAX_COUNT = 1_000_000_000
_MAX_VERSIONS = 1024
# A window dated this far ahead of our clock is dated now instead (a device's clock is off).
_FUTURE_S = 120.0
# Minutes deleted per statement while pruning: a day of a 1,000-device fleet is 1.4M rows,
# too many for one transaction that holds SQLite's only write lock.
_PRUNE_MINUTES = 10


def minute_of(timestamp: float) -> int:
    return int(timestamp // 60)


def _versions(active: dict[str, int]) -> str:
    text = "," + "".join(f"{name}:{version}," for name, version in sorted(active.items()))
    if len(text) <= _MAX_VERSIONS:
        return text if active else ""
    kept = ","
    for name, version in sorted(active.items()):
        part = f"{name}:{version},"
        if len(kept) + len(part) > _MAX_VERSIONS:
            break
        kept += part
    return kept


def _counts(telemetry: Telemetry) -> list[int]:
    """``windows`` and COUNTS of one window, clamped."""
    get = telemetry.counts.get
    cloud, errors = get("answers_cloud", 0), get("errors", 0)
    values = [
        1, get("answers_edge", 0) + cloud + errors, cloud, get("degraded", 0), errors,
        get("rows_total", 0), get("rows_hard", 0), get("rows_cloud", 0), get("rows_degraded", 0),
    ]  # fmt: skip
    if max(values) > _MAX_COUNT:
        values = [min(v, _MAX_COUNT) for v in values]
    return values


@dataclass(frozen=True, slots=True)
class RollupStats:
    """What the writer did since it started (for /metrics and tests)."""

    pending: int
    added: int
    written_rows: int
    flushes: int
    failures: int
    dropped: int
    pruned: int


class HistoryWriter:
    """``add`` from the ingest thread (cheap: a dict update under a lock); a thread flushes
    every ``flush_s`` and deletes minutes older than ``retention_s`` every ``prune_s``."""

    def __init__(
        self,
        database: Database,
        *,
        flush_s: float = 5.0,
        retention_s: float = 14 * 86400.0,
        prune_s: float = 600.0,
        max_pending: int = 200_000,
    ) -> None:
        self.database = database
        self.flush_s = flush_s
        self.retention_s = retention_s
        self.prune_s = prune_s
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], list[Any]] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time (the thread, stop, tests)
        self._upsert = _upsert(database.engine.dialect.name)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)
        self.added = self.written_rows = self.flushes = self.failures = 0
        self.dropped = self.pruned = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending, then stop."""
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self.flush()

    def stats(self) -> RollupStats:
        with self._lock:
            pending = len(self._pending)
        return RollupStats(
            pending, self.added, self.written_rows, self.flushes, self.failures, self.dropped,
            self.pruned,
        )  # fmt: skip

    def add(self, windows: Iterable[tuple[str, Telemetry]]) -> None:
        """Sum telemetry windows into their (device, minute) rows, dated by the window's
        end (a window an agent kept while offline lands in its own minute, not now's).
        Never raises: the ingest that calls it has stored and must ack the batch anyway."""
        try:
            self._add(windows)
        except Exception:
            _LOGGER.exception("history: a batch of telemetry windows was not summed")

    def _add(self, windows: Iterable[tuple[str, Telemetry]]) -> None:
        now = time.time()
        newest = minute_of(now + _FUTURE_S)
        oldest = minute_of(now - self.retention_s)
        with self._lock:
            pending = self._pending
            for device_id, telemetry in windows:
                minute = minute_of(telemetry.at.timestamp())
                if minute > newest:
                    minute = minute_of(now)
                elif minute < oldest:
                    continue  # past the retention: it would be deleted at once
                key = (device_id, minute)
                row = pending.get(key)
                if row is None:
                    if len(pending) >= self.max_pending:
                        self.dropped += 1  # the database is away this long: bounded memory
                        continue
                    row = pending[key] = [*_ZEROS, telemetry.active]
                elif telemetry.active:  # as the upsert: no models said keeps those known
                    row[-1] = telemetry.active
                # Slices and map(add): C loops, a few microseconds a window (B8 measures it).
                row[:_LATENCY_AT] = map(add, row[:_LATENCY_AT], _counts(telemetry))
                histogram = telemetry.latency_ms
                if histogram is not None:
                    counts = histogram.counts
                    if max(counts, default=0) > _MAX_COUNT:
                        counts = [min(c, _MAX_COUNT) for c in counts]
                    where = targets(histogram)
                    if where == _AGENT_TARGETS:
                        # The agent's bounds: bucket i is ours, its +inf is our +inf.
                        end = _LATENCY_AT + len(counts) - 1
                        row[_LATENCY_AT:end] = map(add, row[_LATENCY_AT:end], counts)
                        row[_LATENCY_AT + BUCKETS - 1] += counts[-1]
                    else:
                        for target, count in zip(where, counts, strict=True):
                            row[_LATENCY_AT + target] += count
                self.added += 1

    def flush(self) -> int:
        """Write what is pending; on a database error it stays pending for the next try."""
        with self._flush_lock:
            with self._lock:
                taken, self._pending = self._pending, {}
            if not taken:
                return 0
            try:
                written = self._write(taken)
            except SQLAlchemyError as exc:
                self.failures += 1
                self._put_back(taken)
                _LOGGER.warning(
                    "history: %d device-minutes not written yet (%s); retrying in %.0f s",
                    len(taken), type(exc).__name__, self.flush_s,
                )  # fmt: skip
                return 0
            self.flushes += 1
            self.written_rows += written
            return written

    def prune(self, now: float | None = None) -> int:
        """Delete minutes older than the retention, a few minutes per transaction (the
        writer's thread stops between two when asked to stop)."""
        cutoff = minute_of((time.time() if now is None else now) - self.retention_s)
        deleted = 0
        while now is not None or not self._closing.is_set():
            with self.database.session() as s:
                first = s.scalar(select(func.min(TelemetryMinute.minute)))
                if first is None or first >= cutoff:
                    break
                upto = min(cutoff, first + _PRUNE_MINUTES)
                result = s.execute(delete(_TABLE).where(_TABLE.c.minute < upto))
                deleted += max(getattr(result, "rowcount", 0) or 0, 0)
        self.pruned += deleted
        return deleted

    # -- inside --------------------------------------------------------------------------

    def _run(self) -> None:
        next_prune = time.monotonic()
        while not self._closing.wait(self.flush_s):
            try:
                self.flush()
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + self.prune_s
                    if (deleted := self.prune()) > 0:
                        _LOGGER.info("history: deleted %d device-minutes past retention", deleted)
            except Exception:
                # A bug or an unexpected error: the next round tries again; never the end.
                _LOGGER.exception("history writer round failed")
        try:
            self.flush()
        except Exception:
            _LOGGER.exception("history: final flush failed")

    def _write(self, rows: dict[tuple[str, int], list[Any]]) -> int:
        params = [_params(key, row) for key, row in sorted(rows.items())]
        try:
            with self.database.session() as s:
                s.execute(self._upsert, params)
        except IntegrityError:
            # A device deleted since its windows came in: keep only those that still exist.
            with self.database.session() as s:
                known = set(s.scalars(select(Device.id).where(Device.id.in_({k[0] for k in rows}))))
            params = [p for p in params if p["device_id"] in known]
            if params:
                with self.database.session() as s:
                    s.execute(self._upsert, params)
        return len(params)

    def _put_back(self, taken: dict[tuple[str, int], list[Any]]) -> None:
        with self._lock:
            for key, row in taken.items():
                current = self._pending.get(key)
                if current is None:
                    if len(self._pending) >= self.max_pending:
                        self.dropped += row[0]
                        continue
                    self._pending[key] = row
                else:
                    for index in range(len(SUMS)):
                        current[index] += row[index]


def _params(key: tuple[str, int], row: list[Any]) -> dict[str, Any]:
    versions = _versions(row[-1])
    params: dict[str, Any] = {"device_id": key[0], "minute": key[1], "versions": versions}
    params.update(zip(SUMS, row, strict=False))
    return params


def _upsert(dialect: str) -> Insert:
    """INSERT, or on the (device, minute) already there add to its sums."""
    insert: Any
    if dialect == "postgresql":
        insert = postgresql.insert(_TABLE)
    elif dialect == "sqlite":
        insert = sqlite.insert(_TABLE)
    else:
        raise ValueError(f"history needs SQLite or PostgreSQL, not {dialect}")
    excluded = insert.excluded
    changes: dict[str, Any] = {name: _TABLE.c[name] + excluded[name] for name in SUMS}
    # The later window's models win; a flush never carries an empty list over a known one.
    changes["versions"] = func.coalesce(func.nullif(excluded.versions, ""), _TABLE.c.versions)
    result: Insert = insert.on_conflict_do_update(
        index_elements=["device_id", "minute"], set_=changes
    )
    return result
