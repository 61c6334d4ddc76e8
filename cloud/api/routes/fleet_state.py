"""The fleet's state for operators and the dashboard: a summary (counts by presence, latest
deployment state, active model version and label), a filtered and sorted page of devices, and
one device's state, each aggregated in SQL (``cloud.registry.fleet_queries``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from cloud.api.bounds import INT32_MAX, VersionNumber
from cloud.api.deps import AdminAuth, SessionDep
from cloud.api.routes.history import LabelQuery, parse_labels
from cloud.api.schemas import Name
from cloud.registry import repository
from cloud.registry.fleet_queries import (
    DEGRADED_WINDOW_S,
    DeviceFilter,
    DeviceRow,
    Sort,
    device_page,
    summary,
)
from cloud.registry.tables import DeploymentEvent
from shared.errors import InvalidInput

__all__ = ["router"]

router = APIRouter(prefix="/v1/fleet", tags=["fleet state"])

Presence = Literal["online", "offline", "stopped", "unknown"]


class FleetSummary(BaseModel):
    devices: int
    presence: dict[str, int] = Field(description="devices by presence (online, offline, ...)")
    degraded: int = Field(
        description="devices that served degraded answers or failed requests within "
        "degraded_window_s"
    )
    degraded_window_s: int
    deployment: dict[str, int] = Field(
        description="devices by the state of their latest deployment event ('none': no event)"
    )
    versions: dict[str, int] = Field(description="devices by active model:version")
    labels: dict[str, dict[str, int]] = Field(description="devices by label key, then value")


class LastEvent(BaseModel):
    state: str
    model: str | None
    version: int | None
    rev: int
    rollout_id: int | None
    reason: str | None
    at: datetime

    @classmethod
    def of(cls, event: DeploymentEvent | None) -> LastEvent | None:
        if event is None:
            return None
        return cls(
            state=event.state, model=event.model, version=event.version, rev=event.rev,
            rollout_id=event.rollout_id, reason=event.reason, at=event.at,
        )  # fmt: skip


class DeviceState(BaseModel):
    id: str
    name: str
    labels: dict[str, str]
    presence: str
    last_seen_at: datetime | None
    created_at: datetime
    desired_rev: int
    active: dict[str, int] = Field(description="models the device reports it serves")
    deployment: LastEvent | None = Field(description="its latest deployment event")
    degraded: bool

    @classmethod
    def of(cls, row: DeviceRow) -> DeviceState:
        device = row.device
        active = (device.reported or {}).get("active") or {}
        return cls(
            id=device.id, name=device.name, labels=device.labels, presence=device.presence,
            last_seen_at=device.last_seen_at, created_at=device.created_at,
            desired_rev=device.desired_rev,
            active={str(k): int(v) for k, v in active.items()},
            deployment=LastEvent.of(row.event), degraded=row.degraded,
        )  # fmt: skip


class DevicePage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[DeviceState]


def _utc(value: datetime | None) -> datetime | None:
    """A time without a zone is UTC, as the registry stores it."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


@router.get("/summary", response_model=FleetSummary)
def fleet_summary(
    session: SessionDep,
    _admin: AdminAuth,
    label: LabelQuery = [],  # noqa: B006
) -> FleetSummary:
    """Counts over the fleet, or over the devices with every ``label``."""
    return FleetSummary(**summary(session, labels=parse_labels(label)))


@router.get("/devices", response_model=DevicePage)
def fleet_devices(
    session: SessionDep,
    _admin: AdminAuth,
    label: LabelQuery = [],  # noqa: B006
    model: Annotated[Name | None, Query(description="devices serving this model")] = None,
    version: Annotated[VersionNumber | None, Query(description="...this version of it")] = None,
    presence: Annotated[list[Presence], Query()] = [],  # noqa: B006
    seen_after: Annotated[datetime | None, Query(description="last seen at or after")] = None,
    seen_before: Annotated[datetime | None, Query(description="last seen before")] = None,
    never_seen: bool = False,
    q: Annotated[str | None, Query(max_length=64, description="in the id or name")] = None,
    sort: Sort = "id",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> DevicePage:
    """A page of devices with their presence, active models, latest deployment event and
    whether they are degraded; ``total`` counts every match."""
    if version is not None and model is None:
        raise InvalidInput("version needs model")
    where = DeviceFilter(
        labels=parse_labels(label), model=model, version=version, presence=tuple(presence),
        seen_after=_utc(seen_after), seen_before=_utc(seen_before), never_seen=never_seen,
        text=q or None,
    )  # fmt: skip
    total, rows = device_page(session, where=where, sort=sort, limit=limit, offset=offset)
    items = [DeviceState.of(row) for row in rows]
    return DevicePage(total=total, limit=limit, offset=offset, items=items)


@router.get("/devices/{device_id}", response_model=DeviceState)
def fleet_device(device_id: str, session: SessionDep, _admin: AdminAuth) -> DeviceState:
    """One device's state, as in the page (its history: /v1/devices/{id}/history; its
    events: /v1/devices/{id}/events)."""
    repository.get_device(session, device_id=device_id)
    _total, rows = device_page(
        session, where=DeviceFilter(device_id=device_id), limit=1, window_s=DEGRADED_WINDOW_S
    )
    return DeviceState.of(rows[0])
