"""Reads of the fleet's state for operators: counts by presence, deployment state, model
version and label; a filtered, sorted page of devices; a device's events by cursor. Each is
aggregated in SQL, the same statements on SQLite and PostgreSQL but for the JSON set
functions, so its cost does not grow with a device count the caller has to fetch."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, and_, case, func, or_, select, true
from sqlalchemy.orm import Session

from cloud.registry.tables import DeploymentEvent, Device, TelemetryMinute
from shared.messages import StatusEvent

__all__ = [
    "DEGRADED_WINDOW_S",
    "DeviceFilter",
    "DeviceRow",
    "Sort",
    "device_events",
    "device_page",
    "event_public",
    "label_clauses",
    "summary",
]

# A device is degraded while it served degraded answers or failed requests this recently.
DEGRADED_WINDOW_S = 300
Sort = Literal["id", "-id", "name", "presence", "last_seen", "-last_seen"]


def label_clauses(labels: dict[str, str]) -> list[ColumnElement[bool]]:
    """Devices whose labels hold every pair (JSON_EXTRACT on SQLite, ->> on PostgreSQL)."""
    return [Device.labels[key].as_string() == value for key, value in sorted(labels.items())]


def _active_version(model: str) -> Any:
    return Device.reported[("active", model)]


@dataclass(frozen=True, slots=True)
class DeviceFilter:
    labels: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    version: int | None = None
    presence: tuple[str, ...] = ()
    seen_after: datetime | None = None
    seen_before: datetime | None = None
    never_seen: bool = False
    text: str | None = None
    device_id: str | None = None

    def clauses(self) -> list[ColumnElement[bool]]:
        where = label_clauses(self.labels)
        if self.device_id is not None:
            where.append(Device.id == self.device_id)
        if self.model is not None:
            active = _active_version(self.model)
            if self.version is not None:
                where.append(active.as_integer() == self.version)
            else:
                where.append(active.as_string().is_not(None))
        if self.presence:
            where.append(Device.presence.in_(self.presence))
        if self.seen_after is not None:
            where.append(Device.last_seen_at >= self.seen_after)
        if self.seen_before is not None:
            where.append(Device.last_seen_at < self.seen_before)
        if self.never_seen:
            where.append(Device.last_seen_at.is_(None))
        if self.text:
            where.append(
                or_(
                    Device.id.contains(self.text, autoescape=True),
                    Device.name.contains(self.text, autoescape=True),
                )
            )
        return where


def _latest_event_id() -> Any:
    """The id of the device's latest event: one backward probe of (device_id, id) per row."""
    return (
        select(DeploymentEvent.id)
        .where(DeploymentEvent.device_id == Device.id)
        .order_by(DeploymentEvent.id.desc())
        .limit(1)
        .correlate(Device)
        .scalar_subquery()
    )


def _degraded_clause(window_s: int) -> ColumnElement[bool]:
    since = int((time.time() - window_s) // 60)
    return and_(
        TelemetryMinute.minute >= since,
        or_(
            TelemetryMinute.degraded > 0,
            TelemetryMinute.rows_degraded > 0,
            TelemetryMinute.errors > 0,
        ),
    )


def _json_pairs(session: Session, column: Any, path: str | None) -> Any:
    """A table of (key, value) of a JSON object column, joined laterally per device."""
    if session.get_bind().dialect.name == "postgresql":
        # json_each_text fails on anything but an object: a row that holds another shape
        # (written by hand, or by an older cloud) counts for nothing instead (SQLite gives
        # such a value one row without a key, left out by the callers).
        target = column[path] if path else column
        whole = case((func.json_typeof(target) == "object", target))
        return func.json_each_text(whole).table_valued("key", "value")
    args = (column, f"$.{path}") if path else (column,)
    return func.json_each(*args).table_valued("key", "value")


def summary(
    session: Session, *, labels: dict[str, str], window_s: int = DEGRADED_WINDOW_S
) -> dict[str, Any]:
    """Counts over the devices whose labels hold ``labels``."""
    where = label_clauses(labels)
    presence = dict(
        session.execute(
            select(Device.presence, func.count()).where(*where).group_by(Device.presence)
        ).all()
    )
    state = DeploymentEvent.state
    deployment = {
        (s or "none"): n
        for s, n in session.execute(
            select(state, func.count())
            .select_from(Device)
            .outerjoin(DeploymentEvent, DeploymentEvent.id == _latest_event_id())
            .where(*where)
            .group_by(state)
        ).all()
    }
    active = _json_pairs(session, Device.reported, "active")
    versions = {
        f"{model}:{version}": n
        for model, version, n in session.execute(
            select(active.c.key, active.c.value, func.count())
            .select_from(Device)
            .join(active, true())
            .where(active.c.key.is_not(None), *where)
            .group_by(active.c.key, active.c.value)
        ).all()
    }
    pairs = _json_pairs(session, Device.labels, None)
    by_label: dict[str, dict[str, int]] = {}
    for key, value, n in session.execute(
        select(pairs.c.key, pairs.c.value, func.count())
        .select_from(Device)
        .join(pairs, true())
        .where(pairs.c.key.is_not(None), *where)
        .group_by(pairs.c.key, pairs.c.value)
    ).all():
        by_label.setdefault(str(key), {})[str(value)] = n
    degraded = session.scalar(
        select(func.count(func.distinct(TelemetryMinute.device_id)))
        .join(Device, Device.id == TelemetryMinute.device_id)
        .where(_degraded_clause(window_s), *where)
    )
    return {
        "devices": sum(presence.values()),
        "presence": presence,
        "degraded": int(degraded or 0),
        "degraded_window_s": window_s,
        "deployment": deployment,
        "versions": dict(sorted(versions.items())),
        "labels": {k: dict(sorted(v.items())) for k, v in sorted(by_label.items())},
    }


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: Device
    event: DeploymentEvent | None
    degraded: bool


_ORDER: dict[str, Sequence[Any]] = {
    "id": (Device.id,),
    "-id": (Device.id.desc(),),
    "name": (Device.name, Device.id),
    "presence": (Device.presence, Device.id),
    "last_seen": (Device.last_seen_at.asc().nulls_first(), Device.id),
    "-last_seen": (Device.last_seen_at.desc().nulls_last(), Device.id),
}


def device_page(
    session: Session,
    *,
    where: DeviceFilter,
    sort: Sort = "id",
    limit: int = 50,
    offset: int = 0,
    window_s: int = DEGRADED_WINDOW_S,
) -> tuple[int, list[DeviceRow]]:
    """How many devices match, and one page of them with their latest event."""
    clauses = where.clauses()
    total = session.scalar(select(func.count()).select_from(Device).where(*clauses)) or 0
    query = (
        select(Device, DeploymentEvent)
        .outerjoin(DeploymentEvent, DeploymentEvent.id == _latest_event_id())
        .where(*clauses)
        .order_by(*_ORDER[sort])
        .limit(limit)
        .offset(offset)
    )
    rows: list[tuple[Device, DeploymentEvent | None]] = [
        (row[0], row[1]) for row in session.execute(query).all()
    ]
    ids = [device.id for device, _event in rows]
    degraded = (
        set(
            session.scalars(
                select(TelemetryMinute.device_id)
                .where(TelemetryMinute.device_id.in_(ids), _degraded_clause(window_s))
                .distinct()
            )
        )
        if ids
        else set()
    )
    return total, [DeviceRow(d, e, d.id in degraded) for d, e in rows]


def device_events(
    session: Session, *, device_id: str, limit: int = 100, before: int | None = None
) -> tuple[list[DeploymentEvent], int | None]:
    """The device's events newest first, ``limit`` of them from below event id ``before``;
    and the cursor of the next page (None on the last one)."""
    query = select(DeploymentEvent).where(DeploymentEvent.device_id == device_id)
    if before is not None:
        query = query.where(DeploymentEvent.id < before)
    rows = list(session.scalars(query.order_by(DeploymentEvent.id.desc()).limit(limit + 1)))
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


def event_public(row: DeploymentEvent) -> dict[str, Any]:
    """An event as the device reported it (a StatusEvent, in JSON)."""
    return StatusEvent.model_validate(
        {
            "rev": row.rev, "rollout_id": row.rollout_id, "model": row.model,
            "version": row.version, "state": row.state, "reason": row.reason,
            "bytes_done": row.bytes_done, "bytes_total": row.bytes_total, "at": row.at,
        }
    ).model_dump(mode="json")  # fmt: skip
