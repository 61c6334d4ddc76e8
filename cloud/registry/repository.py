"""Keyword-only data functions over the registry tables; the only place that writes them."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError as SQLIntegrityError
from sqlalchemy.orm import Session

from cloud.registry.tables import Artifact, AuditEvent, Device, Model, ModelVersion
from shared.errors import Conflict, NotFound, Unauthorized
from shared.topics import validate_device_id

__all__ = [
    "add_version",
    "authenticate_device",
    "create_model",
    "delete_device",
    "enroll_device",
    "get_artifact",
    "get_device",
    "get_model",
    "get_version",
    "hash_token",
    "list_audit",
    "list_devices",
    "list_models",
    "list_versions",
    "lock_device",
    "lock_devices",
    "new_device_token",
    "put_artifact",
    "record_audit",
    "restore_device_token",
    "rotate_device_token",
    "touch_device",
]

DEVICE_TOKEN_PREFIX = "efd_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    # Tokens are 256 random bits, so a plain digest is enough (no password stretching needed).
    return hashlib.sha256(token.encode()).hexdigest()


def _flush_or_conflict(session: Session, what: str) -> None:
    try:
        session.flush()
    except SQLIntegrityError as exc:
        session.rollback()
        raise Conflict(f"{what} already exists") from exc


def create_model(
    session: Session, *, name: str, description: str = "", task: str = "classification"
) -> Model:
    if session.scalar(select(Model).where(Model.name == name)) is not None:
        raise Conflict(f"model {name!r} already exists")
    model = Model(name=name, description=description, task=task)
    session.add(model)
    _flush_or_conflict(session, f"model {name!r}")
    return model


def get_model(session: Session, *, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFound(f"unknown model {name!r}")
    return model


def list_models(session: Session) -> list[Model]:
    return list(session.scalars(select(Model).order_by(Model.name)))


def put_artifact(
    session: Session, *, sha256: str, size: int, chunk_size: int, chunk_hashes: list[str]
) -> Artifact:
    """Record an artifact; the same content registered twice, even at once, is the same row."""
    artifact = session.get(Artifact, sha256)
    if artifact is None:
        # Two uploads of the same bytes may both get here: the second insert waits for the
        # first's transaction and then does nothing, instead of failing on the primary key.
        dialect = session.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        session.execute(
            insert(Artifact)
            .values(sha256=sha256, size=size, chunk_size=chunk_size, chunk_hashes=chunk_hashes)
            .on_conflict_do_nothing(index_elements=[Artifact.sha256])
        )
        artifact = session.get(Artifact, sha256)
        if artifact is None:
            raise Conflict(f"artifact {sha256} was removed while being registered")
    return artifact


def get_artifact(session: Session, *, sha256: str) -> Artifact:
    artifact = session.get(Artifact, sha256)
    if artifact is None:
        raise NotFound(f"unknown artifact {sha256}")
    return artifact


def add_version(
    session: Session,
    *,
    model: Model,
    artifact: Artifact,
    precision: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    parent: ModelVersion | None = None,
    metrics: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    routing: dict[str, Any] | None = None,
    trainable: list[str] | None = None,
    healthcheck: dict[str, Any] | None = None,
    source: str = "upload",
    dataset: str | None = None,
) -> ModelVersion:
    """Register the next version of ``model`` (versions are monotonic per model)."""
    if parent is not None and parent.model_id != model.id:
        raise Conflict(f"parent version belongs to another model than {model.name!r}")
    latest = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model.id)
    )
    version = ModelVersion(
        model_id=model.id,
        version=(latest or 0) + 1,
        parent_id=parent.id if parent else None,
        precision=precision,
        artifact_sha256=artifact.sha256,
        inputs=inputs,
        outputs=outputs,
        metrics=metrics or {},
        calibration=calibration or {},
        routing=routing,
        trainable=trainable or [],
        healthcheck=healthcheck or {},
        source=source,
        dataset=dataset,
    )
    session.add(version)
    _flush_or_conflict(session, f"version {(latest or 0) + 1} of {model.name!r}")
    return version


def get_version(session: Session, *, model_name: str, version: int) -> ModelVersion:
    model = get_model(session, name=model_name)
    row = session.scalar(
        select(ModelVersion).where(
            ModelVersion.model_id == model.id, ModelVersion.version == version
        )
    )
    if row is None:
        raise NotFound(f"model {model_name!r} has no version {version}")
    return row


def list_versions(session: Session, *, model_name: str) -> list[ModelVersion]:
    model = get_model(session, name=model_name)
    return list(
        session.scalars(
            select(ModelVersion)
            .where(ModelVersion.model_id == model.id)
            .order_by(ModelVersion.version)
        )
    )


def new_device_token() -> str:
    """A device token: shown once, its hash stored, and also the device's broker password."""
    return DEVICE_TOKEN_PREFIX + secrets.token_urlsafe(32)


def enroll_device(
    session: Session,
    *,
    device_id: str,
    name: str = "",
    labels: dict[str, str] | None = None,
    token: str | None = None,
) -> tuple[Device, str]:
    """Create a device and its token (``token``, or a new one); only its hash is stored."""
    validate_device_id(device_id)
    if session.get(Device, device_id) is not None:
        raise Conflict(f"device {device_id!r} is already enrolled")
    token = token or new_device_token()
    device = Device(id=device_id, name=name, labels=labels or {}, token_hash=hash_token(token))
    session.add(device)
    _flush_or_conflict(session, f"device {device_id!r}")
    return device, token


def authenticate_device(session: Session, *, token: str) -> Device:
    device = session.scalar(select(Device).where(Device.token_hash == hash_token(token)))
    if device is None:
        raise Unauthorized("unknown device token")
    return device


def get_device(session: Session, *, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound(f"unknown device {device_id!r}")
    return device


def lock_device(session: Session, *, device_id: str, to_delete: bool = False) -> Device:
    """The device's row, locked until the unit of work ends, read fresh: changes to one
    device (its desired state and rev) queue behind each other instead of overwriting.

    PostgreSQL locks the row (``SELECT ... FOR NO KEY UPDATE``). SQLite has no row locks and
    pysqlite opens a transaction only at the first write, so a read-then-write would see
    stale data: this unit of work takes the database's write lock up front instead
    (``BEGIN IMMEDIATE``, waiting out ``busy_timeout``; a unit of work that already wrote
    holds it already). Only sessions that call this pay for it; every other session keeps
    pysqlite's usual deferred transactions.
    """
    _sqlite_write_lock(session)
    # FOR NO KEY UPDATE: rows that only reference the device (its status events' foreign
    # key takes KEY SHARE) are still written meanwhile. Deleting it needs FOR UPDATE, taken
    # up front (upgrading later could deadlock with such a writer).
    lock: dict[str, bool] | bool = True if to_delete else {"key_share": True}
    device = session.get(Device, device_id, with_for_update=lock, populate_existing=True)
    if device is None:
        raise NotFound(f"unknown device {device_id!r}")
    return device


def _sqlite_write_lock(session: Session) -> None:
    """SQLite: take the database's write lock now unless this unit of work holds it."""
    connection = session.connection()
    if connection.dialect.name == "sqlite":
        driver = connection.connection.driver_connection
        if driver is not None and not driver.in_transaction:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


def lock_devices(session: Session, *, device_ids: list[str]) -> dict[str, Device]:
    """``lock_device`` for many devices in one query, locked in id order (as every other
    batch takes them, so two batches cannot deadlock); the ids not found are left out."""
    if not device_ids:
        return {}
    _sqlite_write_lock(session)
    rows = session.scalars(
        select(Device)
        .where(Device.id.in_(sorted(set(device_ids))))
        .order_by(Device.id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    ).all()
    return {device.id: device for device in rows}


def list_devices(session: Session, *, labels: dict[str, str] | None = None) -> list[Device]:
    """All devices, or those whose labels include every ``labels`` pair."""
    devices = list(session.scalars(select(Device).order_by(Device.id)))
    if not labels:
        return devices
    return [d for d in devices if all(d.labels.get(k) == v for k, v in labels.items())]


def touch_device(
    session: Session, *, device_id: str, presence: str | None = None, at: datetime | None = None
) -> Device:
    device = get_device(session, device_id=device_id)
    device.last_seen_at = at or datetime.now(UTC)
    if presence is not None:
        device.presence = presence
    session.flush()
    return device


def record_audit(
    session: Session, *, actor: str, action: str, subject: str, detail: dict[str, Any] | None = None
) -> AuditEvent:
    event = AuditEvent(actor=actor, action=action, subject=subject, detail=detail or {})
    session.add(event)
    session.flush()
    return event


def list_audit(session: Session, *, limit: int = 100) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)))


def delete_device(session: Session, *, device_id: str) -> None:
    """Remove a device (read under its lock, so a concurrent change is waited for, and a
    concurrent delete is a NotFound); its events and rollout targets go with it."""
    session.delete(lock_device(session, device_id=device_id, to_delete=True))
    session.flush()


def rotate_device_token(
    session: Session, *, device_id: str, token: str | None = None
) -> tuple[Device, str]:
    """Give a device a new token (``token``, or a new one; returned once); the old one
    stops working."""
    device = lock_device(session, device_id=device_id)
    token = token or new_device_token()
    device.token_hash = hash_token(token)
    session.flush()
    return device, token


def restore_device_token(
    session: Session, *, device_id: str, token: str, previous_hash: str
) -> bool:
    """Undo a rotation to ``token`` (the broker never took it): the device's previous token
    works again. False when the device is gone or holds another token by now."""
    try:
        device = lock_device(session, device_id=device_id)
    except NotFound:
        return False
    if device.token_hash != hash_token(token):
        return False
    device.token_hash = previous_hash
    session.flush()
    return True
