"""The history writer on each registry backend: replicas add up, old minutes go, an outage
keeps what is pending, a deleted device costs only its own rows, a lying device cannot
overflow a sum; and the histogram arithmetic the percentiles rest on."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from cloud.history.buckets import BOUNDS_MS, BUCKETS, percentile, rebin
from cloud.history.rollup import HistoryWriter, minute_of
from cloud.registry import repository
from cloud.registry.database import Database
from cloud.registry.tables import TelemetryMinute
from shared.messages import Histogram, Telemetry, decode
from tests.history_support import AGENT_BOUNDS_MS, telemetry


@pytest.fixture
def db(database: Database) -> Database:
    with database.session() as s:
        for device_id in ("d1", "d2"):
            repository.enroll_device(s, device_id=device_id)
    return database


def _window(at: datetime, **counts: object) -> Telemetry:
    return decode(Telemetry, telemetry(at, **counts))  # type: ignore[arg-type]


def _rows(db: Database) -> dict[tuple[str, int], tuple[int, int, str]]:
    with db.session() as s:
        return {
            (r.device_id, r.minute): (r.windows, r.requests, r.versions)
            for r in s.scalars(select(TelemetryMinute))
        }


NOW = datetime.now(UTC)


def test_two_replicas_writing_the_same_minute_add_up(db: Database) -> None:
    """Fleet replicas split the ingest: each sums its share and upserts; the row holds both
    shares, and the models of the later write."""
    first, second = HistoryWriter(db), HistoryWriter(db)
    first.add([("d1", _window(NOW, edge=3, active={"m": 1}))])
    second.add([("d1", _window(NOW, edge=4, errors=1, active={"m": 2}))])
    first.add([("d1", _window(NOW, edge=1))])  # no models said: the known ones stay
    assert first.flush() == 1
    assert second.flush() == 1
    assert _rows(db) == {("d1", minute_of(NOW.timestamp())): (3, 9, ",m:2,")}


def test_minutes_past_the_retention_are_deleted_and_never_written(db: Database) -> None:
    """Retention of one hour: a window two hours old is not kept; a row of two hours ago
    (written under a longer retention) is deleted by the prune, today's stays."""
    long_ago = NOW - timedelta(hours=2)
    keeper = HistoryWriter(db, retention_s=86400)
    keeper.add([("d1", _window(long_ago, edge=1)), ("d2", _window(NOW, edge=1))])
    keeper.flush()
    writer = HistoryWriter(db, retention_s=3600)
    writer.add([("d1", _window(long_ago, edge=5))])
    assert writer.stats().pending == 0
    assert writer.prune(now=time.time()) == 1
    assert list(_rows(db)) == [("d2", minute_of(NOW.timestamp()))]


def test_a_window_from_the_future_is_dated_now(db: Database) -> None:
    """A device whose clock is a day ahead does not write tomorrow's history."""
    writer = HistoryWriter(db)
    writer.add([("d1", _window(NOW + timedelta(days=1), edge=2))])
    writer.flush()
    (minute,) = [m for _d, m in _rows(db)]
    assert abs(minute - minute_of(time.time())) <= 1


def test_an_outage_keeps_what_is_pending_for_the_next_flush(db: Database) -> None:
    """The table cannot be written (renamed away here): the flush fails, nothing is lost,
    windows keep coming in; once it is back, one flush writes all of it."""
    writer = HistoryWriter(db)
    writer.add([("d1", _window(NOW, edge=2))])
    with db.engine.begin() as conn:
        conn.execute(text("ALTER TABLE telemetry_minutes RENAME TO telemetry_away"))
    try:
        assert writer.flush() == 0
        assert writer.stats().failures == 1
        writer.add([("d1", _window(NOW, edge=3)), ("d2", _window(NOW, edge=1))])
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE telemetry_away RENAME TO telemetry_minutes"))
    assert writer.flush() == 2
    minute = minute_of(NOW.timestamp())
    assert _rows(db) == {("d1", minute): (2, 5, ""), ("d2", minute): (1, 1, "")}


def test_a_device_deleted_before_the_flush_costs_only_its_rows(db: Database) -> None:
    writer = HistoryWriter(db)
    writer.add([("d1", _window(NOW, edge=1)), ("d2", _window(NOW, edge=2))])
    with db.session() as s:
        repository.delete_device(s, device_id="d1")
    assert writer.flush() == 1
    assert [d for d, _m in _rows(db)] == ["d2"]


def test_a_lying_count_cannot_overflow_the_sums(db: Database) -> None:
    """Counts are clamped per window: 2^62 twice would pass what a BIGINT holds."""
    writer = HistoryWriter(db)
    huge = 2**62
    writer.add([("d1", _window(NOW, edge=huge)), ("d1", _window(NOW, edge=huge))])
    writer.add([("d2", _window(NOW, edge=1))])
    assert writer.flush() == 2
    with db.session() as s:
        assert s.scalar(select(func.max(TelemetryMinute.requests))) == 2_000_000_000


def test_stop_writes_what_is_pending(db: Database) -> None:
    writer = HistoryWriter(db, flush_s=3600)
    writer.start()
    writer.add([("d1", _window(NOW, edge=1))])
    writer.stop()
    assert len(_rows(db)) == 1


def test_the_agents_histogram_lands_exactly_and_others_only_move_up() -> None:
    """The agent's bounds are ours: each count stays in its bucket. A histogram with other
    bounds goes to the bucket holding each upper bound: 3 ms -> (2, 5], 7 -> (5, 10]."""
    counts = list(range(1, len(AGENT_BOUNDS_MS) + 2))
    exact = rebin(Histogram(bounds=AGENT_BOUNDS_MS, counts=counts))
    assert exact[: len(counts) - 1] == counts[:-1]
    assert exact[-1] == counts[-1]  # past the agent's last bound: ours past all
    assert sum(exact) == sum(counts)
    other = rebin(Histogram(bounds=[3.0, 7.0, 9000.0], counts=[1, 2, 3, 4]))
    assert other[BOUNDS_MS.index(5.0)] == 1
    assert other[BOUNDS_MS.index(10.0)] == 2
    assert other[BUCKETS - 1] == 7


def test_percentiles_interpolate_inside_the_bucket() -> None:
    counts = [0] * BUCKETS
    counts[BOUNDS_MS.index(10.0)] = 100  # all in (5, 10] ms
    assert percentile(counts, 0.5) == pytest.approx(7.5)
    assert percentile(counts, 0.99) == pytest.approx(9.95)
    assert percentile([0] * BUCKETS, 0.5) is None
    tail = [0] * BUCKETS
    tail[-1] = 1
    assert percentile(tail, 0.5) == BOUNDS_MS[-1]
