"""Fleet operations: point a device at a model version; its events and live view."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.deps import AdminAuth, ContextDep, SessionDep
from cloud.fleet.service import FleetService
from cloud.registry import repository
from shared.errors import ServiceUnavailable

__all__ = ["router"]

router = APIRouter(prefix="/v1/devices", tags=["fleet"])


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1)


class DeploymentAccepted(BaseModel):
    device_id: str
    model: str
    version: int
    rev: int


def _fleet(request: Request) -> FleetService:
    fleet: FleetService | None = getattr(request.app.state, "fleet", None)
    if fleet is None:
        raise ServiceUnavailable("the fleet service is not running in this process")
    return fleet


@router.put(
    "/{device_id}/deployments/{model}",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DeploymentAccepted,
)
def deploy(
    device_id: str, model: str, body: DeploymentRequest, request: Request, actor: AdminAuth
) -> DeploymentAccepted:
    """Sign a new desired state for the device (rev + 1) and publish it; the device reports
    progress on its status topic (see `/events`)."""
    fleet = _fleet(request)
    state = fleet.deploy(device_id=device_id, model=model, version=body.version)
    with fleet.context.database.session() as s:
        repository.record_audit(
            s, actor=actor, action="device.deploy", subject=device_id,
            detail={"model": model, "version": body.version, "rev": state.rev},
        )  # fmt: skip
    return DeploymentAccepted(device_id=device_id, model=model, version=body.version, rev=state.rev)


@router.get("/{device_id}/events")
def events(
    device_id: str,
    request: Request,
    session: SessionDep,
    _actor: AdminAuth,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Deployment status events the device reported, newest first."""
    repository.get_device(session, device_id=device_id)
    return _fleet(request).events(device_id, limit)


@router.get("/{device_id}/live")
def live(
    device_id: str, session: SessionDep, context: ContextDep, _actor: AdminAuth
) -> dict[str, Any]:
    """The live view from Redis: presence, last status, reported state, latest telemetry."""
    repository.get_device(session, device_id=device_id)
    raw = context.redis.hgetall(f"edgefleet:device:{device_id}")
    view: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.decode() if isinstance(key, bytes) else str(key)
        text = value.decode() if isinstance(value, bytes) else str(value)
        view[name] = json.loads(text) if text.startswith("{") else text
    telemetry = context.redis.get(f"edgefleet:telemetry:{device_id}")
    view["telemetry"] = json.loads(telemetry) if telemetry else None
    return view
