"""Device enrollment, token rotation and deletion (admin, with the device's broker login),
listing, and a device's view of itself."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from sqlalchemy.exc import SQLAlchemyError

from cloud.api.deps import AdminAuth, ContextDep, DeviceAuth, SessionDep
from cloud.api.schemas import DeviceCreate, DeviceEnrolled, DevicePublic, DeviceSelf
from cloud.broker.provisioning import BrokerAccounts, broker_accounts
from cloud.context import CloudContext
from cloud.fleet.desired import DEVICE_DELETED
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.registry import repository
from cloud.registry.tables import Device
from shared.errors import Conflict, EdgeFleetError, InvalidInput, NotFound, ServiceUnavailable
from shared.signing import key_id, public_key_b64

__all__ = ["router"]

_LOGGER = logging.getLogger(__name__)

router = APIRouter(tags=["devices"])

_BROKER_DOWN: dict[int | str, dict[str, Any]] = {
    503: {
        "description": "the broker (or the registry) was unreachable or refused the change; "
        "the device is as it was, or the error says what to repeat"
    }
}

# How the registry and the broker stay in step. The broker is asked outside any database
# transaction: SQLite has one write lock for the whole database, and a slow broker (several
# waits of broker_timeout_s) must not hold it. Each change orders its steps so that a
# failure at any one leaves both sides agreeing, or errs toward less access:
# - enroll: the broker login first, then the row; a row that cannot be written takes the
#   login away again (a login the registry does not know would let a stranger in).
# - rotate: the new token's hash first, then the broker; a broker that says no gets the old
#   hash restored (the broker cannot be given back an old password: it only has its hash).
# - delete: the login goes first, then the row; a row that cannot be removed leaves a device
#   without broker access, which deleting again finishes. Then its retained topics go.
# Changes to one device are serialized within this process; two replicas changing the same
# device at the same moment are not (each change is still checked against the row after).
_LOCK_STRIPES = 64
_LOCKS = [threading.Lock() for _ in range(_LOCK_STRIPES)]


@contextmanager
def _changing(device_id: str) -> Iterator[None]:
    with _LOCKS[zlib.crc32(device_id.encode()) % _LOCK_STRIPES]:
        yield


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


def _registry_failed(exc: SQLAlchemyError, what: str) -> ServiceUnavailable:
    _LOGGER.error("registry write failed: %s (%s)", what, type(exc).__name__)
    return ServiceUnavailable(f"the registry could not store the change: {what}")


def _remove_login(accounts: BrokerAccounts, device_id: str, why: str) -> None:
    try:
        accounts.remove_device(device_id)
    except EdgeFleetError as exc:
        _LOGGER.error("the broker keeps a login for %s (%s): %s", device_id, why, exc.message)


@router.post(
    "/v1/devices",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceEnrolled,
    responses=_BROKER_DOWN,
)
def enroll_device(body: DeviceCreate, context: ContextDep, actor: AdminAuth) -> DeviceEnrolled:
    """Enroll a device: its token (shown once) is also its broker password."""
    device_id = body.device_id
    with _changing(device_id):
        with context.database.session() as s:
            # A conflict never touches the broker (nor replaces the enrolled device's login).
            if s.get(Device, device_id) is not None:
                raise Conflict(f"device {device_id!r} is already enrolled")
        token = repository.new_device_token()
        accounts = _accounts(context)
        accounts.provision_device(device_id, token)
        try:
            with context.database.session() as s:
                device, _ = repository.enroll_device(
                    s, device_id=device_id, name=body.name, labels=body.labels, token=token
                )
                repository.record_audit(
                    s, actor=actor, action="device.enroll", subject=device_id,
                    detail={"labels": body.labels},
                )  # fmt: skip
        except Conflict:
            # Another replica enrolled it in between: the login is its, or was replaced by
            # ours; removing it would lock that device out for sure. Say so instead.
            _LOGGER.warning(
                "device %s was enrolled concurrently elsewhere; if its agent cannot log in to "
                "the broker, rotate its token", device_id,
            )  # fmt: skip
            raise
        except SQLAlchemyError as exc:
            _remove_login(accounts, device_id, "its enrollment was not stored")
            raise _registry_failed(exc, f"device {device_id!r} was not enrolled") from exc
        except BaseException:
            _remove_login(accounts, device_id, "its enrollment was not stored")
            raise
    return _enrolled(context, device, token)


@router.post("/v1/devices/{device_id}/token", response_model=DeviceEnrolled, responses=_BROKER_DOWN)
def rotate_device_token(device_id: str, context: ContextDep, actor: AdminAuth) -> DeviceEnrolled:
    """Re-enroll a device: a new token (shown once) and broker password; the old ones stop
    working and its broker session is closed."""
    with _changing(device_id):
        token = repository.new_device_token()
        try:
            with context.database.session() as s:
                previous = repository.lock_device(s, device_id=device_id).token_hash
                device, _ = repository.rotate_device_token(s, device_id=device_id, token=token)
                repository.record_audit(
                    s, actor=actor, action="device.rotate_token", subject=device_id
                )
        except SQLAlchemyError as exc:
            raise _registry_failed(exc, "the token was not rotated") from exc
        accounts = _accounts(context)
        try:
            accounts.provision_device(device_id, token)
        except ServiceUnavailable as exc:
            _undo_rotation(context, device_id, token, previous, exc)
            raise ServiceUnavailable(f"{exc.message}; the token was not rotated") from exc
        except BaseException as exc:
            _undo_rotation(context, device_id, token, previous, exc)
            raise
        with context.database.session() as s:
            if s.get(Device, device_id) is None:
                # Deleted (by another replica) while the broker was asked: no login outlives it.
                _remove_login(accounts, device_id, "it was deleted during its rotation")
                raise NotFound(f"unknown device {device_id!r}")
    return _enrolled(context, device, token)


def _undo_rotation(
    context: CloudContext, device_id: str, token: str, previous: str, cause: BaseException
) -> None:
    """The broker did not take the new token: the device keeps its old one (in the registry;
    a broker that ran part of the change may have dropped its login until a new rotation)."""
    reason = cause.message if isinstance(cause, EdgeFleetError) else type(cause).__name__
    try:
        with context.database.session() as s:
            if repository.restore_device_token(
                s, device_id=device_id, token=token, previous_hash=previous
            ):
                repository.record_audit(
                    s, actor="cloud", action="device.rotate_token.undone", subject=device_id,
                    detail={"reason": reason[:500]},
                )  # fmt: skip
    except SQLAlchemyError:
        _LOGGER.exception(
            "rotation of %s failed and its old token could not be restored: rotate again",
            device_id,
        )


@router.delete(
    "/v1/devices/{device_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_BROKER_DOWN
)
def delete_device(
    device_id: str, request: Request, context: ContextDep, actor: AdminAuth
) -> Response:
    """Delete a device, its history, its broker login (its session is closed) and what the
    broker retains for it (its desired state, reported state and presence)."""
    with _changing(device_id):
        with context.database.session() as s:
            repository.get_device(s, device_id=device_id)  # a 404 never touches the broker
        _accounts(context).remove_device(device_id)
        try:
            with context.database.session() as s:
                repository.delete_device(s, device_id=device_id)
                # Also the keeper's record that this device's retained topics must go.
                repository.record_audit(s, actor=actor, action=DEVICE_DELETED, subject=device_id)
        except SQLAlchemyError as exc:
            raise _registry_failed(
                exc, f"device {device_id!r} has no broker login now but is not deleted: delete "
                "it again",
            ) from exc  # fmt: skip
        _clear_retained(request, device_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _clear_retained(request: Request, device_id: str) -> None:
    # The fleet service holds the cloud's broker session; an API running without one cannot
    # publish, and the fleet service clears every recently deleted device when it connects.
    fleet = getattr(request.app.state, "fleet", None)
    keeper: DesiredStateKeeper | None = getattr(fleet, "desired", None)
    if keeper is None:
        _LOGGER.info(
            "device %s deleted; its retained topics are cleared when the fleet service "
            "connects", device_id,
        )  # fmt: skip
        return
    try:
        if not keeper.clear(device_id):
            _LOGGER.warning("the broker did not take the clearing of %s yet; retrying", device_id)
    except SQLAlchemyError as exc:
        # The deletion stands (and is recorded): the next connect clears it.
        _LOGGER.warning(
            "retained topics of %s not cleared now (%s); the fleet service's next connect "
            "clears them", device_id, type(exc).__name__,
        )  # fmt: skip


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
