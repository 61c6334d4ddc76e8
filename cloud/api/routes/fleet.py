"""Fleet operations: point a device at a model version, its desired state, events, live view."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.bounds import INT32_MAX
from cloud.api.deps import AdminAuth, ContextDep, SessionDep
from cloud.fleet.desired import stored_state
from cloud.fleet.keeper import Issued
from cloud.fleet.service import FleetService
from cloud.registry import repository
from cloud.registry.fleet_queries import device_events, event_public
from shared.errors import NotFound, ServiceUnavailable
from shared.messages import DesiredState

__all__ = ["router"]

router = APIRouter(prefix="/v1/devices", tags=["fleet"])


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(ge=1, le=INT32_MAX)


_NOT_PUBLISHED = (
    "signed and stored, but the broker did not take it yet: the cloud sends it again shortly "
    "and on every reconnect; do not repeat the request (it would sign another rev)"
)


class DeploymentAccepted(BaseModel):
    device_id: str
    model: str
    version: int
    rev: int
    published: bool = Field(description="handed to the broker (else: sent again shortly)")
    note: str | None = None


class DesiredDeployment(BaseModel):
    model: str
    version: int
    rollout_id: int | None


class DesiredPublic(BaseModel):
    """A device's signed desired state, as an operator reads it."""

    device_id: str
    rev: int
    issued_at: datetime
    expires_at: datetime
    deployments: list[DesiredDeployment]

    @classmethod
    def of(cls, state: DesiredState) -> DesiredPublic:
        return cls(
            device_id=state.device_id,
            rev=state.rev,
            issued_at=state.issued_at,
            expires_at=state.expires_at,
            deployments=[
                DesiredDeployment(
                    model=d.manifest.model, version=d.manifest.version, rollout_id=d.rollout_id
                )
                for d in state.deployments
            ],
        )


class DesiredIssued(DesiredPublic):
    """A desired state just signed under a new rev, and whether the broker has it yet."""

    published: bool
    note: str | None = None

    @classmethod
    def issued(cls, issued: Issued) -> DesiredIssued:
        public = DesiredPublic.of(issued.state).model_dump()
        return cls(**public, published=issued.published, note=_note(issued))


def _note(issued: Issued) -> str | None:
    return None if issued.published else _NOT_PUBLISHED


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
    """Sign a new desired state for the device (rev + 1), store it with the audit record and
    publish it; the device reports progress on its status topic (see `/events`). Once
    stored the answer is 202 even when the broker did not take it yet (``published``
    false): it follows shortly, and repeating the request would sign another rev."""
    issued = _fleet(request).desired.issue_deployment(
        device_id=device_id, model=model, version=body.version, actor=actor
    )
    return DeploymentAccepted(
        device_id=device_id,
        model=model,
        version=body.version,
        rev=issued.state.rev,
        published=issued.published,
        note=_note(issued),
    )


@router.get("/{device_id}/desired", response_model=DesiredPublic)
def desired(device_id: str, session: SessionDep, _actor: AdminAuth) -> DesiredPublic:
    """The desired state last signed for the device (its rev, validity and models); it is
    re-signed under the same rev before it expires."""
    state = stored_state(repository.get_device(session, device_id=device_id))
    if state is None:
        raise NotFound(f"device {device_id!r} has no desired state yet")
    return DesiredPublic.of(state)


@router.post(
    "/{device_id}/desired/retry",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=DesiredIssued,
)
def retry(device_id: str, request: Request, actor: AdminAuth) -> DesiredIssued:
    """Sign the device's current models again under a new rev and publish it: a device
    ignores a rev it already took, even one that FAILED, so this is how it tries again.
    409 when the device has no desired state yet."""
    return DesiredIssued.issued(_fleet(request).desired.retry(device_id=device_id, actor=actor))


@router.get("/{device_id}/events")
def events(
    device_id: str,
    response: Response,
    session: SessionDep,
    _actor: AdminAuth,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[
        str | None,
        Query(pattern=r"^[1-9][0-9]{0,17}$", description="X-Next-Cursor of the page before"),
    ] = None,
) -> list[dict[str, Any]]:
    """Deployment status events the device reported, newest first; when there are older
    ones, the X-Next-Cursor header holds the ``cursor`` that pages on to them."""
    repository.get_device(session, device_id=device_id)
    rows, following = device_events(
        session, device_id=device_id, limit=limit, before=int(cursor) if cursor else None
    )
    if following is not None:
        response.headers["X-Next-Cursor"] = str(following)
    return [event_public(row) for row in rows]


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
