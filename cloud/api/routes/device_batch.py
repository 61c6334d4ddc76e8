"""Enroll many devices in one call (a fleet, a simulator): the same steps as one enrollment
(broker logins first, then the rows), done for all in one broker connection and one
transaction — all of them, or none."""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from fastapi import APIRouter, status
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from cloud.api.deps import AdminAuth, ContextDep
from cloud.api.routes.devices import _BROKER_DOWN, _LOCK_STRIPES, _LOCKS, _accounts
from cloud.api.routes.devices import _device_mqtt_url as device_mqtt_url
from cloud.api.schemas import DeviceCreate, DevicePublic, Strict
from cloud.broker.provisioning import BrokerAccounts
from cloud.context import CloudContext
from cloud.registry import repository
from cloud.registry.tables import Device
from shared.errors import Conflict, EdgeFleetError, InvalidInput, ServiceUnavailable
from shared.signing import key_id, public_key_b64

__all__ = ["MAX_BATCH", "router"]

_LOGGER = logging.getLogger(__name__)
router = APIRouter(tags=["devices"])

MAX_BATCH = 1000


class DeviceBatchCreate(Strict):
    devices: list[DeviceCreate] = Field(min_length=1, max_length=MAX_BATCH)


class DeviceToken(BaseModel):
    device: DevicePublic
    token: str = Field(description="shown once; only its hash is stored")


class DeviceBatchEnrolled(BaseModel):
    public_key: str = Field(description="the cloud's Ed25519 key (base64) to pin on the devices")
    key_id: str
    mqtt_url: str
    devices: list[DeviceToken]


@contextmanager
def _changing_all(device_ids: list[str]) -> Iterator[None]:
    """The per-device locks of one enrollment (devices.py), taken in one order: no deadlock
    with another batch or a single change."""
    stripes = sorted({zlib.crc32(d.encode()) % _LOCK_STRIPES for d in device_ids})
    with ExitStack() as held:
        for stripe in stripes:
            held.enter_context(_LOCKS[stripe])
        yield


def _undo_after_a_race(context: CloudContext, accounts: BrokerAccounts, ids: list[str]) -> None:
    """Another replica enrolled some of ``ids`` after our check (our rows were rolled back):
    their logins are theirs, or were replaced by ours, and removing them would lock those
    devices out for sure (the one-device route's rule); the others' logins are ours to take
    away. Which ones are enrolled now is read again: a race may have taken more than one."""
    try:
        with context.database.session() as s:
            theirs = set(s.scalars(select(Device.id).where(Device.id.in_(ids))))
    except SQLAlchemyError:
        _LOGGER.exception(
            "after a concurrent enrollment the registry could not say which of %d devices are "
            "enrolled; their broker logins are kept (enroll the others again)", len(ids),
        )  # fmt: skip
        return
    for device_id in sorted(theirs):
        _LOGGER.warning(
            "device %s was enrolled concurrently elsewhere; if its agent cannot log in to the "
            "broker, rotate its token", device_id,
        )  # fmt: skip
    try:
        accounts.remove_devices([d for d in ids if d not in theirs])
    except EdgeFleetError as undo:
        _LOGGER.error(
            "the broker keeps logins for devices whose enrollment was not stored (%s); enroll "
            "them again to replace them", undo.message,
        )  # fmt: skip


@router.post(
    "/v1/devices/bulk",
    status_code=status.HTTP_201_CREATED,
    response_model=DeviceBatchEnrolled,
    responses=_BROKER_DOWN,
)
def enroll_devices(
    body: DeviceBatchCreate, context: ContextDep, actor: AdminAuth
) -> DeviceBatchEnrolled:
    """Enroll up to 1,000 devices; each token (shown once) is also its broker password. One
    already enrolled, or named twice, refuses the whole batch and changes nothing."""
    ids = [d.device_id for d in body.devices]
    twice = sorted(d for d, n in Counter(ids).items() if n > 1)
    if twice:
        raise InvalidInput(f"devices named more than once: {', '.join(twice[:5])}")
    with _changing_all(ids):
        with context.database.session() as s:
            known = sorted(s.scalars(select(Device.id).where(Device.id.in_(ids))))
        if known:
            more = f" and {len(known) - 5} more" if len(known) > 5 else ""
            raise Conflict(f"already enrolled: {', '.join(known[:5])}{more}")
        tokens = {d: repository.new_device_token() for d in ids}
        accounts = _accounts(context)
        accounts.provision_devices(list(tokens.items()))
        try:
            with context.database.session() as s:
                devices = []
                for wanted in body.devices:
                    device, _ = repository.enroll_device(
                        s, device_id=wanted.device_id, name=wanted.name, labels=wanted.labels,
                        token=tokens[wanted.device_id],
                    )  # fmt: skip
                    repository.record_audit(
                        s, actor=actor, action="device.enroll", subject=wanted.device_id,
                        detail={"labels": wanted.labels, "bulk": True},
                    )  # fmt: skip
                    devices.append(device)
                s.flush()
                enrolled = [
                    DeviceToken(device=DevicePublic.model_validate(d), token=tokens[d.id])
                    for d in devices
                ]
        except Conflict:
            _undo_after_a_race(context, accounts, ids)
            raise
        except BaseException as exc:
            try:
                accounts.remove_devices(ids)
            except EdgeFleetError as undo:
                _LOGGER.error(
                    "the broker keeps logins for %d devices whose enrollment was not stored "
                    "(%s); enroll them again to replace them", len(ids), undo.message,
                )  # fmt: skip
            if isinstance(exc, SQLAlchemyError):
                raise ServiceUnavailable(
                    "the registry could not store the change: no device was enrolled"
                ) from exc
            raise
    public = context.signing_key.public_key()
    return DeviceBatchEnrolled(
        public_key=public_key_b64(public),
        key_id=key_id(public),
        mqtt_url=device_mqtt_url(context),
        devices=enrolled,
    )
