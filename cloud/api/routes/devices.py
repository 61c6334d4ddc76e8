"""Device enrollment, token rotation and deletion (admin, with the device's broker login),
listing, and a device's view of itself."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status
from sqlalchemy.orm import Session

from cloud.api.deps import AdminAuth, ContextDep, DeviceAuth, SessionDep
from cloud.api.schemas import DeviceCreate, DeviceEnrolled, DevicePublic, DeviceSelf
from cloud.broker.provisioning import BrokerAccounts, broker_accounts
from cloud.context import CloudContext
from cloud.registry import repository
from cloud.registry.tables import Device
from shared.errors import EdgeFleetError, InvalidInput
from shared.signing import key_id, public_key_b64

__all__ = ["router"]

_LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])

_BROKER_DOWN: dict[int | str, dict[str, Any]] = {
    503: {"description": "the broker was unreachable or refused the change; nothing changed"}
}


def _device_mqtt_url(context: CloudContext) -> str:
    return context.settings.device_mqtt_url or context.urls.mqtt_url


def _accounts(context: CloudContext) -> BrokerAccounts:
    return broker_accounts(context.settings, context.urls.mqtt_url)


def _enrolled(context: CloudContext, device: Device, token: str) -> DeviceEnrolled:
    public = context.signing_key.public_key()
    return DeviceEnrolled(
        device=DevicePublic.model_validate(device),
        token=token,
        public_key=public_key_b64(public),
        key_id=key_id(public),
        mqtt_url=_device_mqtt_url(context),
    )


# The registry row is written (not committed) before the broker is asked, so a conflict
# never touches the broker; the broker is asked before the commit, so a broker that says no
# leaves the registry as it was (the session rolls back on the error).


@router.post(
    "/v1/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceEnrolled,
    responses=_BROKER_DOWN,
)
def enroll_device(
    body: DeviceCreate, session: SessionDep, context: ContextDep, actor: AdminAuth
) -> DeviceEnrolled:
    """Enroll a device: its token (shown once) is also its broker password."""
    device, token = repository.enroll_device(
        session, device_id=body.device_id, name=body.name, labels=body.labels
    )
    repository.record_audit(
        session,
        actor=actor,
        action="device.enroll",
        subject=device.id,
        detail={"labels": body.labels},
    )
    accounts = _accounts(context)
    accounts.provision_device(device.id, token)
    _commit_or_remove_login(session, accounts, device.id)
    return _enrolled(context, device, token)


def _commit_or_remove_login(session: Session, accounts: BrokerAccounts, device_id: str) -> None:
    try:
        session.commit()
    except Exception:
        # A login without a registry row would let a device the cloud does not know in.
        try:
            accounts.remove_device(device_id)
        except EdgeFleetError:
            _LOGGER.exception("the broker keeps a login for %s that was never enrolled", device_id)
        raise


@router.post("/v1/devices/{device_id}/token", response_model=DeviceEnrolled, responses=_BROKER_DOWN)
def rotate_device_token(
    device_id: str, session: SessionDep, context: ContextDep, actor: AdminAuth
) -> DeviceEnrolled:
    """Re-enroll a device: a new token (shown once) and broker password; the old ones stop
    working and its broker session is closed."""
    device, token = repository.rotate_device_token(session, device_id=device_id)
    repository.record_audit(session, actor=actor, action="device.rotate_token", subject=device.id)
    _accounts(context).provision_device(device.id, token)
    return _enrolled(context, device, token)


@router.delete(
    "/v1/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_BROKER_DOWN
)
def delete_device(
    device_id: str, session: SessionDep, context: ContextDep, actor: AdminAuth
) -> Response:
    """Delete a device, its history and its broker login (its session is closed)."""
    repository.delete_device(session, device_id=device_id)
    repository.record_audit(session, actor=actor, action="device.delete", subject=device_id)
    _accounts(context).remove_device(device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _parse_selector(selector: list[str]) -> dict[str, str]:
    labels = {}
    for item in selector:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise InvalidInput(f"label selector {item!r} must look like key=value")
        labels[key] = value
    return labels


@router.get("/v1/devices", response_model=list[DevicePublic])
def list_devices(
    session: SessionDep,
    _actor: AdminAuth,
    label: Annotated[list[str], Query(description="key=value, all must match")] = [],  # noqa: B006
) -> list[DevicePublic]:
    devices = repository.list_devices(session, labels=_parse_selector(label))
    return [DevicePublic.model_validate(d) for d in devices]


@router.get("/v1/devices/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _actor: AdminAuth) -> DevicePublic:
    return DevicePublic.model_validate(repository.get_device(session, device_id=device_id))


@router.get("/v1/device", response_model=DeviceSelf)
def device_self(device: DeviceAuth, context: ContextDep) -> DeviceSelf:
    """What `edge-agent enroll` fetches with the device's token: its id and the key to pin."""
    public = context.signing_key.public_key()
    return DeviceSelf(
        device=DevicePublic.model_validate(device),
        public_key=public_key_b64(public),
        key_id=key_id(public),
        mqtt_url=_device_mqtt_url(context),
    )
