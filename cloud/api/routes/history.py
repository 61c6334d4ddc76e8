"""Telemetry history over REST: the fleet's (or a labelled part of it, or the devices running
a model) and one device's, in time buckets, aggregated in the database (``cloud.history``)."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from cloud.api.deps import AdminAuth, SessionDep
from cloud.history.queries import HistoryQuery, read_series
from cloud.registry import repository
from shared.errors import InvalidInput

__all__ = ["parse_labels", "router"]

router = APIRouter(tags=["history"])

# Steps a range is cut in when none is asked for: the smallest giving at most this many points.
_STEPS_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86400)
_TARGET_POINTS = 240
MAX_POINTS = 2000
_MAX_RANGE = timedelta(days=3650)
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(:[1-9][0-9]{0,9})?$")
_LABEL = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")

LabelQuery = Annotated[list[str], Query(description="key=value (or key:value), all must match")]
_MAX_LABELS = 32


class HistoryPointPublic(BaseModel):
    device_minutes: int = Field(
        description="(device, minute) pairs with telemetry: one device reporting all through "
        "a 5-minute bucket counts 5"
    )
    windows: int
    requests: int
    answers_cloud: int
    degraded: int
    errors: int
    rows_total: int
    rows_hard: int
    rows_cloud: int
    rows_degraded: int
    offload_rate: float | None = Field(description="rows_hard / rows_total")
    cloud_rate: float | None = Field(description="rows_cloud / rows_total")
    degraded_rate: float | None = Field(description="rows_degraded / rows_total")
    error_rate: float | None = Field(description="errors / requests")
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    latency_counts: list[int] = Field(description="the summed histogram on latency_bounds_ms")


class HistoryPointAt(HistoryPointPublic):
    t: datetime = Field(description="the bucket's start")


class HistoryTotals(HistoryPointPublic):
    devices: int = Field(description="distinct devices that reported in the range")


class VersionCount(BaseModel):
    t: datetime
    version: str = Field(description="model:version")
    device_minutes: int = Field(description="minutes of the bucket devices ran it, summed")


class HistoryPublic(BaseModel):
    start: datetime
    end: datetime
    step_s: int
    device_id: str | None
    labels: dict[str, str]
    model: str | None
    latency_bounds_ms: list[float]
    totals: HistoryTotals
    points: list[HistoryPointAt]
    versions: list[VersionCount]


def parse_labels(items: list[str]) -> dict[str, str]:
    """``key=value`` pairs; ``key:value`` too where there is no ``=`` (label keys and values
    may hold ':' themselves, never '=', so ``=`` is the unambiguous form)."""
    if len(items) > _MAX_LABELS:
        raise InvalidInput(f"at most {_MAX_LABELS} label selectors")
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=") if "=" in item else item.partition(":")
        if not sep or not _LABEL.match(key) or not _LABEL.match(value):
            raise InvalidInput(f"label selector {item!r} must look like key=value")
        labels[key] = value
    return labels


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _query(
    start: datetime | None,
    end: datetime | None,
    step: int | None,
    *,
    device_id: str | None = None,
    labels: dict[str, str] | None = None,
    model: str | None = None,
) -> HistoryQuery:
    try:
        end = _aware(end) if end is not None else datetime.now(UTC)
        start = _aware(start) if start is not None else end - timedelta(hours=1)
        start.timestamp(), end.timestamp()
    except (OverflowError, ValueError):
        raise InvalidInput("from and to must be instants between the years 1 and 9999") from None
    if start >= end:
        raise InvalidInput("from must be before to")
    if end - start > _MAX_RANGE:
        raise InvalidInput("a range spans at most 3650 days")
    span = (end - start).total_seconds()
    if step is None:
        step = next((s for s in _STEPS_S if span / s <= _TARGET_POINTS), _STEPS_S[-1])
    if step % 60:
        raise InvalidInput("step is in seconds, a multiple of 60 (history is kept per minute)")
    if span / step > MAX_POINTS:
        raise InvalidInput(
            f"{math.ceil(span / step)} points asked for; at most {MAX_POINTS}: use a larger step"
        )
    if model is not None and not _MODEL.match(model):
        raise InvalidInput(f"model {model!r} must be a model name or name:version")
    return HistoryQuery(
        start=int(start.timestamp() // 60),
        end=int(end.timestamp() // 60) + (1 if end.timestamp() % 60 else 0),
        step=step // 60,
        device_id=device_id,
        labels=labels or {},
        model=model,
    )


def _public(query: HistoryQuery, session: SessionDep) -> HistoryPublic:
    series: dict[str, Any] = read_series(session, query).public()
    return HistoryPublic(
        start=datetime.fromtimestamp(query.start * 60, UTC),
        end=datetime.fromtimestamp(query.end * 60, UTC),
        step_s=query.step * 60,
        device_id=query.device_id,
        labels=query.labels,
        model=query.model,
        **series,
    )


FromQuery = Annotated[
    datetime | None, Query(alias="from", description="ISO 8601; default: an hour before to")
]
ToQuery = Annotated[datetime | None, Query(alias="to", description="ISO 8601; default: now")]
StepQuery = Annotated[
    int | None,
    Query(ge=60, le=30 * 86400, description="bucket size in seconds, a multiple of 60"),
]


@router.get("/v1/history/fleet", response_model=HistoryPublic)
def fleet_history(
    session: SessionDep,
    _admin: AdminAuth,
    start: FromQuery = None,
    end: ToQuery = None,
    step: StepQuery = None,
    label: LabelQuery = [],  # noqa: B006
    model: Annotated[str | None, Query(description="name or name:version")] = None,
) -> HistoryPublic:
    """Requests, offload, cloud rows, degraded rows, errors and latency percentiles summed
    over the devices (those with every label, running the model) per time bucket."""
    query = _query(start, end, step, labels=parse_labels(label), model=model)
    return _public(query, session)


@router.get("/v1/devices/{device_id}/history", response_model=HistoryPublic)
def device_history(
    device_id: str,
    session: SessionDep,
    _admin: AdminAuth,
    start: FromQuery = None,
    end: ToQuery = None,
    step: StepQuery = None,
) -> HistoryPublic:
    """One device's history, in the same shape as the fleet's."""
    repository.get_device(session, device_id=device_id)
    return _public(_query(start, end, step, device_id=device_id), session)
