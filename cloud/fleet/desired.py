"""Desired state: what a device should run, as a signed, monotonic document."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.orm import Session

from cloud.registry import repository
from cloud.registry.tables import Device, ModelVersion
from shared.errors import NotFound
from shared.messages import (
    ArtifactRef,
    Deployment,
    DesiredState,
    HealthCheckSpec,
    Manifest,
    RoutingSpec,
    TensorSpec,
)
from shared.signing import SignedEnvelope, sign

__all__ = ["DOCUMENT_LIFETIME", "manifest_for", "set_deployment", "signed_desired_state"]

# Long enough to ride out a week offline; the retained document is re-signed on change.
DOCUMENT_LIFETIME = timedelta(days=30)


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


def signed_desired_state(
    session: Session, *, device: Device, key: Ed25519PrivateKey, now: datetime | None = None
) -> tuple[DesiredState, SignedEnvelope]:
    """Bump the device's rev and sign its whole desired state (every model it should run)."""
    now = now or datetime.now(UTC)
    deployments = []
    for model_name, entry in sorted((device.desired or {}).items()):
        row = session.get(ModelVersion, entry["version_id"])
        if row is None:
            raise NotFound(f"desired version of {model_name} no longer exists")
        deployments.append(
            Deployment(rollout_id=entry.get("rollout_id"), manifest=manifest_for(row))
        )
    device.desired_rev = (device.desired_rev or 0) + 1
    state = DesiredState(
        device_id=device.id,
        rev=device.desired_rev,
        issued_at=now,
        expires_at=now + DOCUMENT_LIFETIME,
        deployments=deployments,
    )
    session.flush()
    repository.record_audit(
        session,
        actor="fleet",
        action="desired.sign",
        subject=device.id,
        detail={
            "rev": state.rev,
            "models": {d.manifest.model: d.manifest.version for d in deployments},
        },
    )
    return state, sign(state, key)
