"""Device enrollment and listing (admin), and a device's view of itself."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from cloud.api.deps import AdminAuth, ContextDep, DeviceAuth, SessionDep
from cloud.api.schemas import DeviceCreate, DeviceEnrolled, DevicePublic, DeviceSelf
from cloud.context import CloudContext
from cloud.registry import repository
from shared.errors import InvalidInput
from shared.signing import key_id, public_key_b64

__all__ = ["router"]

router = APIRouter(tags=["devices"])


def _device_mqtt_url(context: CloudContext) -> str:
    return context.settings.device_mqtt_url or context.urls.mqtt_url


@router.post("/v1/devices", status_code=status.HTTP_201_CREATED, response_model=DeviceEnrolled)
def enroll_device(
    body: DeviceCreate, session: SessionDep, context: ContextDep, actor: AdminAuth
) -> DeviceEnrolled:
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
    public = context.signing_key.public_key()
    return DeviceEnrolled(
        device=DevicePublic.model_validate(device),
        token=token,
        public_key=public_key_b64(public),
        key_id=key_id(public),
        mqtt_url=_device_mqtt_url(context),
    )


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
