"""ORM tables of the registry; API schemas live apart in ``cloud.api.schemas``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "Artifact",
    "AuditEvent",
    "Base",
    "DeploymentEvent",
    "Device",
    "FederatedRound",
    "FederatedRun",
    "Model",
    "ModelVersion",
    "Rollout",
    "RolloutTarget",
    "TelemetryMinute",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


Timestamp = DateTime(timezone=True)


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(String(32), default="classification")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model",
        order_by="ModelVersion.version",
        foreign_keys="ModelVersion.model_id",
    )


class Artifact(Base):
    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    chunk_size: Mapped[int] = mapped_column(Integer)
    chunk_hashes: Mapped[list[Any]] = mapped_column(JSON)
    media_type: Mapped[str] = mapped_column(String(64), default="application/onnx")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), nullable=True)
    precision: Mapped[str] = mapped_column(String(8))
    artifact_sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256"))
    inputs: Mapped[list[Any]] = mapped_column(JSON)
    outputs: Mapped[list[Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    calibration: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    routing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    trainable: Mapped[list[Any]] = mapped_column(JSON, default=list)
    healthcheck: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source: Mapped[str] = mapped_column(String(32), default="upload")
    # Where evaluation data for this version comes from, e.g. "builtin:digits".
    dataset: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions", foreign_keys=[model_id])
    artifact: Mapped[Artifact] = relationship()


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    token_hash: Mapped[str] = mapped_column(String(128), unique=True)
    presence: Mapped[str] = mapped_column(String(16), default="unknown", index=True)
    reported: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    desired_rev: Mapped[int] = mapped_column(Integer, default=0)
    # What the device should run: {model: {"version_id": id, "rollout_id": id | None}}.
    desired: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The signed desired-state envelope of rev ``desired_rev``, as published: the source of
    # truth a broker or Redis that lost it is given back from; re-signed after renew_at.
    desired_document: Mapped[str | None] = mapped_column(Text, nullable=True)
    desired_expires_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    desired_renew_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True, index=True)


class DeploymentEvent(Base):
    """Every status a device reported about a deployment: the history behind the live view."""

    __tablename__ = "deployment_events"
    # A device's events newest first, and its latest one (the fleet summary reads it for
    # every device), in one index probe each on PostgreSQL too.
    __table_args__ = (Index("ix_deployment_events_device_latest", "device_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    rev: Mapped[int] = mapped_column(Integer)
    rollout_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    model: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    bytes_done: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_total: Mapped[int] = mapped_column(BigInteger, default=0)
    at: Mapped[datetime] = mapped_column(Timestamp)
    received_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    # blake2b-128 of (device id, payload bytes): a QoS 1 message the broker delivers again
    # (its ack was lost with a connection) is stored once. NULL for rows from before 0005.
    dedup_key: Mapped[str | None] = mapped_column(String(32), nullable=True, unique=True)


class Rollout(Base):
    """A model version (or, for an undeploy, none) taken to the devices a label selector
    names, wave by wave (``cloud.rollout``). Every decision the engine takes is a row change
    here, so a second engine that takes over goes on from exactly where the first stopped."""

    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int | None] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), nullable=True, index=True
    )
    # None for an undeploy: the model leaves the devices' desired state.
    model_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id"), nullable=True, index=True
    )
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    strategy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="PENDING", index=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    superseded_by: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True)
    # The wave the engine works on (-1: none started yet), and when it started.
    current_wave: Mapped[int] = mapped_column(Integer, default=-1)
    wave_started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # The highest fencing token of an engine that wrote here: a deposed leader's writes fail.
    fence: Mapped[int] = mapped_column(BigInteger, default=0)
    created_by: Mapped[str] = mapped_column(String(64), default="admin")
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)

    targets: Mapped[list[RolloutTarget]] = relationship(back_populates="rollout")


class RolloutTarget(Base):
    __tablename__ = "rollout_targets"
    __table_args__ = (UniqueConstraint("rollout_id", "device_id", name="uq_rollout_targets_pair"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), index=True
    )
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), index=True)
    wave: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="PENDING")
    previous_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id"), nullable=True
    )
    # The rev that took the new version (or, while reverting, the previous one) to the device:
    # only its status events count, and it is due by started_at + the strategy's timeout.
    rev: Mapped[int | None] = mapped_column(Integer, nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)

    rollout: Mapped[Rollout] = relationship(back_populates="targets")


class FederatedRun(Base):
    """A federated update of a model's head (``cloud.federated``): submitted to the SuperLink
    as a Flower run, its rounds recorded, and its result gated, registered (FP32 in
    ``result_version_id``, INT8 in ``result_int8_version_id``) and maybe rolled out."""

    __tablename__ = "federated_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    base_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    result_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id"), nullable=True
    )
    state: Mapped[str] = mapped_column(String(16), default="PENDING", index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    # Why the run is in its state (a failure, a refusal by the gate, too few devices).
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Flower's run id: an unsigned 64-bit number, kept as text.
    flower_run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    selector: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result_int8_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("model_versions.id"), nullable=True
    )
    rollout_id: Mapped[int | None] = mapped_column(ForeignKey("rollouts.id"), nullable=True)
    created_by: Mapped[str] = mapped_column(String(64), default="admin")
    submitted_at: Mapped[datetime | None] = mapped_column(Timestamp, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, onupdate=utcnow)

    rounds: Mapped[list[FederatedRound]] = relationship(
        back_populates="run", order_by="FederatedRound.round"
    )


class FederatedRound(Base):
    """One round of a federated run, as the ServerApp reported it."""

    __tablename__ = "federated_rounds"
    __table_args__ = (UniqueConstraint("run_id", "round", name="uq_federated_rounds_run_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(
        ForeignKey("federated_runs.id", ondelete="CASCADE"), index=True
    )
    round: Mapped[int] = mapped_column(Integer)
    clients: Mapped[int] = mapped_column(Integer)  # replies aggregated
    dropped: Mapped[int] = mapped_column(Integer, default=0)  # asked, no reply in time
    refused: Mapped[int] = mapped_column(Integer, default=0)  # replied with a refusal
    examples: Mapped[int] = mapped_column(Integer, default=0)
    train_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    wall_s: Mapped[float] = mapped_column(Float, default=0.0)
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0)  # server -> devices
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0)  # devices -> server
    # Per device: node, device id, examples, loss, or why it did not take part.
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow)

    run: Mapped[FederatedRun] = relationship(back_populates="rounds")


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(Timestamp, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TelemetryMinute(Base):
    """What a device's telemetry windows said, summed per minute (``cloud.history``): the
    history the dashboard charts. Every column but ``versions`` is a sum, so rows written by
    several fleet replicas for the same minute add up (an upsert adds)."""

    __tablename__ = "telemetry_minutes"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    # Minutes since the Unix epoch (UTC) of the window's end: integer buckets of any size
    # are one expression on SQLite and PostgreSQL alike (minute - minute % step).
    minute: Mapped[int] = mapped_column(Integer, primary_key=True, index=True)
    windows: Mapped[int] = mapped_column(Integer, default=0)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    answers_cloud: Mapped[int] = mapped_column(BigInteger, default=0)
    degraded: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_total: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_hard: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_cloud: Mapped[int] = mapped_column(BigInteger, default=0)
    rows_degraded: Mapped[int] = mapped_column(BigInteger, default=0)
    # The latency histogram on cloud.history.buckets.BOUNDS_MS; lat_13 is past the last bound.
    lat_00: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_01: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_02: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_03: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_04: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_05: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_06: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_07: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_08: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_09: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_10: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_11: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_12: Mapped[int] = mapped_column(BigInteger, default=0)
    lat_13: Mapped[int] = mapped_column(BigInteger, default=0)
    # The models the device ran, ",name:version," each (the last window's), so a filter on
    # a model is one LIKE on both backends.
    versions: Mapped[str] = mapped_column(String(1024), default="")
