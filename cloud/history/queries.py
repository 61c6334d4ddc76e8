"""History read back for charts: per time bucket, sums over devices (GROUP BY in SQL) of the
per-minute rows, rates and latency percentiles derived from the summed histograms, and the
devices running each model version. One statement per series, whatever the fleet's size."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Select, func, select
from sqlalchemy.orm import Session

from cloud.history.buckets import BOUNDS_MS, percentile
from cloud.history.rollup import COUNTS, LATENCY, SUMS
from cloud.registry.fleet_queries import label_clauses
from cloud.registry.tables import Device, TelemetryMinute

__all__ = ["HistoryQuery", "Point", "Series", "read_series"]

_T = TelemetryMinute
_S = TypeVar("_S", bound=Select[*tuple[Any, ...]])


@dataclass(frozen=True, slots=True)
class HistoryQuery:
    """Minutes [start, end) in buckets of ``step`` minutes (aligned on the epoch), of one
    device or of those whose labels hold ``labels`` and that ran ``model`` (name or
    name:version)."""

    start: int
    end: int
    step: int
    device_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    model: str | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = [_T.minute >= self.start, _T.minute < self.end]
        if self.device_id is not None:
            where.append(_T.device_id == self.device_id)
        if self.model is not None:
            # ",name:" matches any version of it, ",name:version," that one.
            needle = f",{self.model}," if ":" in self.model else f",{self.model}:"
            where.append(_T.versions.contains(needle, autoescape=True))
        return where

    def apply(self, query: _S) -> _S:
        query = query.where(*self.clauses())
        if self.labels:
            query = query.join(Device, Device.id == _T.device_id).where(*label_clauses(self.labels))
        return query


@dataclass(slots=True)
class Point:
    """Sums over a bucket (or the whole range) and what follows from them."""

    devices: int
    sums: dict[str, int]
    latency: list[int]

    def public(self) -> dict[str, Any]:
        sums = self.sums
        rows = sums["rows_total"]
        requests = sums["requests"]
        return {
            "devices": self.devices,
            **sums,
            "offload_rate": _rate(sums["rows_hard"], rows),
            "cloud_rate": _rate(sums["rows_cloud"], rows),
            "degraded_rate": _rate(sums["rows_degraded"], rows),
            "error_rate": _rate(sums["errors"], requests),
            "p50_ms": _round(percentile(self.latency, 0.50)),
            "p95_ms": _round(percentile(self.latency, 0.95)),
            "p99_ms": _round(percentile(self.latency, 0.99)),
            "latency_counts": self.latency,
        }


@dataclass(slots=True)
class Series:
    totals: Point
    points: list[tuple[datetime, Point]]
    versions: list[tuple[datetime, str, int]]

    def public(self) -> dict[str, Any]:
        return {
            "latency_bounds_ms": list(BOUNDS_MS),
            "totals": self.totals.public(),
            "points": [{"t": t, **p.public()} for t, p in self.points],
            "versions": [{"t": t, "version": v, "devices": n} for t, v, n in self.versions],
        }


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 6) if whole else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _at(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)


def _point(row: Any, offset: int) -> Point:
    values = [int(v or 0) for v in row[offset:]]
    sums = dict(zip(("windows", *COUNTS), values, strict=False))
    return Point(int(row[offset - 1] or 0), sums, values[len(SUMS) - len(LATENCY) :])


def read_series(session: Session, query: HistoryQuery) -> Series:
    sums = [func.sum(_T.__table__.c[name]) for name in SUMS]
    devices = func.count(func.distinct(_T.device_id))
    bucket = (_T.minute - _T.minute % query.step).label("bucket")
    rows = session.execute(
        query.apply(select(bucket, devices, *sums)).group_by(bucket).order_by(bucket)
    ).all()
    total = session.execute(query.apply(select(devices, *sums))).one()
    versions: dict[tuple[int, str], int] = {}
    rows_by_version = session.execute(
        query.apply(select(bucket, _T.versions, devices)).group_by(bucket, _T.versions)
    ).all()
    for at, text, count in rows_by_version:
        for version in filter(None, str(text).split(",")):
            versions[(at, version)] = versions.get((at, version), 0) + int(count)
    return Series(
        totals=_point(total, 1),
        points=[(_at(int(row[0])), _point(row, 2)) for row in rows],
        versions=[(_at(at), v, n) for (at, v), n in sorted(versions.items())],
    )
