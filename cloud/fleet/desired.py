"""Desired state: what a device should run, as a signed, monotonic document stored in SQL."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from cloud.registry import repository
from cloud.registry.tables import AuditEvent, DeploymentEvent, Device, ModelVersion
from shared.errors import Conflict, NotFound, PayloadTooLarge
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredState,
    HealthCheckSpec,
    Manifest,
    RoutingSpec,
    TensorSpec,
    decode,
)
from shared.signing import SignedEnvelope, canonical_json, sign

__all__ = [
    "DEVICE_DELETED",
    "MAX_DOCUMENT_BYTES",
    "MAX_REV",
    "applied_rev",
    "applied_revs",
    "check_documents_fit",
    "desired_artifacts",
    "desired_artifacts_of",
    "devices_deleted_since",
    "devices_due_for_renewal",
    "devices_with_documents",
    "issue",
    "manifest_for",
    "postpone_renewal",
    "renew",
    "renewal_due",
    "set_deployment",
    "sign_next",
    "signing_audit",
    "stored_state",
]

# The audit action of a device's deletion: also the keeper's record of which devices' retained
# topics to clear (written in the deleting transaction, so it survives any crash after it).
DEVICE_DELETED = "device.delete"
# ``devices.desired_rev`` is an int4 on PostgreSQL.
MAX_REV = 2**31 - 1
# A signed document travels as one retained MQTT message. The shipped brokers take packets
# of at most 2 MiB (deploy/mosquitto max_packet_size, the embedded BROKER_MAX_PAYLOAD); the
# topic and headers take a few hundred bytes of that. A larger packet is not refused back:
# Mosquitto drops the cloud's connection, paho sends it again after the reconnect, and the
# device never gets it. So a document that would not fit is never signed.
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024 - 16 * 1024
# The envelope around the base64 payload: {"payload":"","signature":"<88>","key_id":"<16>"}.
_ENVELOPE_BYTES = len(
    SignedEnvelope(payload="", signature="=" * 88, key_id="0" * 16).model_dump_json()
)
# A time as long as any in a document (microseconds are left out when they are 0).
_LONGEST_TIME = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def manifest_for(row: ModelVersion) -> Manifest:
    artifact = row.artifact
    return Manifest(
        model=row.model.name,
        version=row.version,
        precision=row.precision,
        artifact=ArtifactRef(
            sha256=artifact.sha256,
            size=artifact.size,
            chunk_size=artifact.chunk_size,
            chunks=list(artifact.chunk_hashes),
        ),
        inputs=[TensorSpec.model_validate(s) for s in row.inputs],
        outputs=[TensorSpec.model_validate(s) for s in row.outputs],
        routing=RoutingSpec.model_validate(row.routing) if row.routing else None,
        trainable=list(row.trainable),
        healthcheck=HealthCheckSpec.model_validate(row.healthcheck or {}),
    )


def set_deployment(
    *,
    device: Device,
    version: ModelVersion,
    rollout_id: int | None = None,
) -> None:
    """Record that ``device`` should run ``version`` of its model (replacing any other)."""
    desired = dict(device.desired or {})
    desired[version.model.name] = {"version_id": version.id, "rollout_id": rollout_id}
    device.desired = desired


def _build(
    session: Session, *, device: Device, rev: int, now: datetime, lifetime: timedelta
) -> DesiredState:
    deployments = []
    for model_name, entry in sorted((device.desired or {}).items()):
        row = session.get(ModelVersion, entry["version_id"])
        if row is None:
            raise NotFound(f"desired version of {model_name} no longer exists")
        deployments.append(
            Deployment(rollout_id=entry.get("rollout_id"), manifest=manifest_for(row))
        )
    return DesiredState(
        device_id=device.id,
        rev=rev,
        issued_at=now,
        expires_at=now + lifetime,
        deployments=deployments,
    )


def _signed_bytes(payload_bytes: int) -> int:
    """The size of the envelope of a payload of ``payload_bytes`` bytes."""
    return 4 * -(-payload_bytes // 3) + _ENVELOPE_BYTES


def _too_large(device_id: str, size: int, manifests: dict[str, int]) -> PayloadTooLarge:
    parts = ", ".join(f"{name} {n:,} B" for name, n in sorted(manifests.items()))
    return PayloadTooLarge(
        f"the desired state of device {device_id!r} would be {size:,} bytes signed "
        f"(deployments: {parts}), over the {MAX_DOCUMENT_BYTES:,} bytes one broker message "
        "carries: the device could never receive it. Deploy fewer models to it, or versions "
        "with smaller routing specs (a second opinion's weights travel in the document)"
    )


def _check_fits(state: DesiredState, envelope: SignedEnvelope) -> None:
    size = len(envelope.model_dump_json())
    if size > MAX_DOCUMENT_BYTES:
        manifests = {d.manifest.model: len(canonical_json(d.manifest)) for d in state.deployments}
        raise _too_large(state.device_id, size, manifests)


def check_documents_fit(session: Session, *, device_ids: list[str], version: ModelVersion) -> None:
    """PayloadTooLarge (413) unless each of ``device_ids``' documents, with ``version`` in
    place of whatever version of its model the device runs, fits one broker message: checked
    when a rollout is created, before any device is moved. An upper bound of the signed
    size, from each version's deployment entry measured once."""
    model = version.model.name
    entries: dict[int, int] = {}

    def entry_bytes(row: ModelVersion) -> int:
        if row.id not in entries:
            entry = Deployment(rollout_id=MAX_REV, manifest=manifest_for(row))
            entries[row.id] = len(canonical_json(entry))
        return entries[row.id]

    chosen = set(device_ids)
    # All rows, filtered here: an IN list of a whole fleet's ids is past SQLite's limits.
    rows = session.execute(select(Device.id, Device.desired).order_by(Device.id))
    for device_id, desired in rows.all():
        if device_id not in chosen:
            continue
        sizes = {model: entry_bytes(version)}
        for name, entry in (desired or {}).items():
            other = session.get(ModelVersion, entry["version_id"]) if name != model else None
            if other is not None:
                sizes[name] = entry_bytes(other)
        empty = DesiredState(
            device_id=device_id, rev=MAX_REV, issued_at=_LONGEST_TIME.replace(year=9998),
            expires_at=_LONGEST_TIME, deployments=[],
        )  # fmt: skip
        # Each entry after the first adds a comma.
        payload = len(canonical_json(empty)) + sum(sizes.values()) + len(sizes) - 1
        size = _signed_bytes(payload)
        if size > MAX_DOCUMENT_BYTES:
            raise _too_large(device_id, size, sizes)


def _store(device: Device, state: DesiredState, envelope: SignedEnvelope) -> None:
    # Renewal is due once a third of the lifetime is left.
    device.desired_document = envelope.model_dump_json()
    device.desired_expires_at = state.expires_at
    device.desired_renew_at = state.issued_at + (state.expires_at - state.issued_at) * 2 / 3


def _models(state: DesiredState) -> dict[str, int]:
    return {d.manifest.model: d.manifest.version for d in state.deployments}


def applied_rev(session: Session, device: Device) -> int:
    """The highest rev the device itself says it took: its reported ``rev_applied`` and the
    revs of its status events. A re-enrolled device (its row, and so ``desired_rev``, new)
    may run an agent that applied rev 5 of its former row; it refuses anything lower."""
    reported = (device.reported or {}).get("rev_applied")
    from_report = reported if isinstance(reported, int) and not isinstance(reported, bool) else 0
    from_events = session.scalar(
        select(func.max(DeploymentEvent.rev)).where(DeploymentEvent.device_id == device.id)
    )
    return max(from_report, from_events or 0)


def applied_revs(session: Session, devices: list[Device]) -> dict[str, int]:
    """``applied_rev`` of many devices in one query (their status events' highest revs)."""
    ids = [device.id for device in devices]
    from_events: dict[str, int] = {}
    if ids:
        rows = session.execute(
            select(DeploymentEvent.device_id, func.max(DeploymentEvent.rev))
            .where(DeploymentEvent.device_id.in_(ids))
            .group_by(DeploymentEvent.device_id)
        ).all()
        from_events = {device_id: int(rev or 0) for device_id, rev in rows}
    result: dict[str, int] = {}
    for device in devices:
        reported = (device.reported or {}).get("rev_applied")
        from_report = (
            reported if isinstance(reported, int) and not isinstance(reported, bool) else 0
        )
        result[device.id] = max(from_report, from_events.get(device.id, 0))
    return result


def issue(
    session: Session,
    *,
    device: Device,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
    actor: str = "fleet",
    now: datetime | None = None,
) -> DesiredState:
    """Give the device a new rev, above both the last one signed and any the device says it
    applied, sign its whole desired state (every model it should run) and store the signed
    document on its row; the caller holds the row lock (``repository.lock_device``) so
    concurrent changes get distinct, increasing revs."""
    state = sign_next(
        session, device=device, key=key, lifetime=lifetime,
        applied=applied_rev(session, device), now=now,
    )  # fmt: skip
    session.flush()
    repository.record_audit(session, **signing_audit(state, actor=actor))
    return state


def sign_next(
    session: Session,
    *,
    device: Device,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
    applied: int,
    now: datetime | None = None,
) -> DesiredState:
    """``issue`` without its flush and audit, for a caller that writes many devices at once:
    ``applied`` is the device's ``applied_rev`` (read in bulk by ``applied_revs``), and the
    caller adds ``signing_audit``'s event. Conflict when no higher rev can be signed, before
    the row is changed."""
    now = now or datetime.now(UTC)
    floor = max(device.desired_rev or 0, applied)
    if floor >= MAX_REV:
        raise Conflict(f"device {device.id!r} reports rev {floor}: no higher rev can be signed")
    state = _build(session, device=device, rev=floor + 1, now=now, lifetime=lifetime)
    envelope = sign(state, key)
    _check_fits(state, envelope)  # before the row changes: a refusal leaves it as it was
    device.desired_rev = floor + 1
    _store(device, state, envelope)
    return state


def signing_audit(state: DesiredState, *, actor: str) -> dict[str, Any]:
    """The audit record of a signed rev (``repository.record_audit``'s arguments)."""
    return {
        "actor": actor,
        "action": "desired.sign",
        "subject": state.device_id,
        "detail": {"rev": state.rev, "models": _models(state)},
    }


def renew(
    session: Session,
    *,
    device: Device,
    key: Ed25519PrivateKey,
    lifetime: timedelta,
    now: datetime | None = None,
) -> DesiredState:
    """Re-sign the device's current document with a fresh validity window, under the SAME rev.

    Why the rev stays: the agent ignores a rev equal to the highest it queued and refuses a
    lower one (``Deployer.on_desired``). A renewed document says nothing new, so a device
    that already took this rev must not run its deployments again; bumping the rev would
    make every device of the fleet re-run (and re-report) them once per renewal period, and
    would silently retry a FAILED rev that an operator should retry on purpose (a new rev
    through the API). A device that never took this rev (it was offline, or it was
    re-installed) takes the renewed copy as it would have taken the original. Replaying an
    older copy of the same rev gains an attacker nothing: the deployments are identical.

    A row migrated from before documents were stored has none: its document is rebuilt
    from ``devices.desired``, which was written in the same transaction as its last rev.
    """
    now = now or datetime.now(UTC)
    current = stored_state(device)
    if current is None:
        if not device.desired_rev:
            raise Conflict(f"device {device.id!r} has no desired state to renew")
        state = _build(session, device=device, rev=device.desired_rev, now=now, lifetime=lifetime)
    else:
        state = current.model_copy(update={"issued_at": now, "expires_at": now + lifetime})
    envelope = sign(state, key)
    _check_fits(state, envelope)
    _store(device, state, envelope)
    session.flush()
    repository.record_audit(
        session,
        actor="fleet",
        action="desired.renew",
        subject=device.id,
        detail={"rev": state.rev, "expires_at": state.expires_at.isoformat()},
    )
    return state


def stored_state(device: Device) -> DesiredState | None:
    """The document last signed for ``device`` (as stored, signature not re-checked)."""
    if device.desired_document is None:
        return None
    envelope = SignedEnvelope.model_validate_json(device.desired_document)
    return decode(DesiredState, base64.b64decode(envelope.payload))


def renewal_due(device: Device, *, now: datetime) -> bool:
    at = device.desired_renew_at
    if at is None:
        return False
    # SQLite hands timestamps back without their zone; they were written in UTC.
    return (at if at.tzinfo else at.replace(tzinfo=UTC)) <= now


def postpone_renewal(session: Session, *, device_id: str, until: datetime, now: datetime) -> None:
    """Move a renewal that failed to ``until``, unless the row changed (and so was re-signed)
    meanwhile: a row that fails every time must not stay first in line."""
    session.execute(
        update(Device)
        .where(Device.id == device_id, Device.desired_renew_at <= now)
        .values(desired_renew_at=until)
    )


def devices_with_documents(session: Session) -> list[str]:
    """Every device that has a signed document to keep on the broker."""
    return list(
        session.scalars(
            select(Device.id).where(Device.desired_document.is_not(None)).order_by(Device.id)
        )
    )


def devices_deleted_since(session: Session, *, since: datetime) -> list[str]:
    """Ids of devices deleted since ``since`` (some may be enrolled again by now)."""
    return list(
        session.scalars(
            select(AuditEvent.subject)
            .where(AuditEvent.action == DEVICE_DELETED, AuditEvent.at >= since)
            .distinct()
            .order_by(AuditEvent.subject)
        )
    )


def devices_due_for_renewal(session: Session, *, now: datetime, limit: int = 500) -> list[str]:
    """Devices whose document has less than a third of its lifetime left, oldest first."""
    return list(
        session.scalars(
            select(Device.id)
            .where(Device.desired_renew_at <= now)
            .order_by(Device.desired_renew_at)
            .limit(limit)
        )
    )


def desired_artifacts(session: Session, *, device: Device) -> set[str]:
    """The sha256 of every artifact in ``device``'s desired state: all it may download."""
    return set(_artifacts_of(session, {device.id: device.desired})[device.id])


def desired_artifacts_of(session: Session, device_ids: list[str]) -> dict[str, frozenset[str]]:
    """:func:`desired_artifacts` for many devices in two queries; a device the registry does
    not have is left out."""
    rows = session.execute(select(Device.id, Device.desired).where(Device.id.in_(device_ids)))
    return _artifacts_of(session, {row[0]: row[1] for row in rows})


def _artifacts_of(
    session: Session, desired: dict[str, dict[str, Any] | None]
) -> dict[str, frozenset[str]]:
    """Each device's artifacts from its desired deployments: one query for all."""
    wanted = {
        device_id: [entry["version_id"] for entry in (deployments or {}).values()]
        for device_id, deployments in desired.items()
    }
    version_ids = {version_id for ids in wanted.values() for version_id in ids}
    shas: dict[int, str] = {}
    if version_ids:
        found = select(ModelVersion.id, ModelVersion.artifact_sha256).where(
            ModelVersion.id.in_(version_ids)
        )
        shas = {int(row[0]): str(row[1]) for row in session.execute(found).all()}
    return {
        device_id: frozenset(shas[v] for v in ids if v in shas) for device_id, ids in wanted.items()
    }
