"""REST schemas, apart from the ORM tables (XCreate / XPublic)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud.api.bounds import VersionNumber
from shared.messages import HealthCheckSpec, RoutingSpec, TensorSpec

__all__ = [
    "AuditPublic",
    "DeviceCreate",
    "DeviceEnrolled",
    "DevicePublic",
    "DeviceSelf",
    "ModelCreate",
    "ModelPublic",
    "VersionCreate",
    "VersionPublic",
]

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ModelCreate(Strict):
    name: Name
    description: str = Field(default="", max_length=2000)
    task: Literal["classification", "embedding", "regression", "other"] = "classification"


class ModelPublic(Public):
    name: str
    description: str
    task: str
    created_at: datetime
    latest_version: int | None = None


class VersionCreate(Strict):
    """Metadata sent beside the ONNX file; the IO spec is read from the file itself."""

    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    parent_version: VersionNumber | None = None
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)
    routing: RoutingSpec | None = None
    trainable: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(
        default_factory=list, max_length=64
    )
    healthcheck: HealthCheckSpec = Field(default_factory=HealthCheckSpec)


class VersionPublic(BaseModel):
    model: str
    version: int
    parent_version: int | None
    precision: str
    sha256: str
    size: int
    chunk_size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metrics: dict[str, Any]
    calibration: dict[str, Any]
    routing: RoutingSpec | None
    trainable: list[str]
    source: str
    created_at: datetime


class DeviceCreate(Strict):
    device_id: Name
    name: str = Field(default="", max_length=128)
    labels: dict[Label, Label] = Field(default_factory=dict, max_length=32)


class DevicePublic(Public):
    id: str
    name: str
    labels: dict[str, str]
    presence: str
    reported: dict[str, Any]
    desired_rev: int
    created_at: datetime
    last_seen_at: datetime | None


class DeviceEnrolled(BaseModel):
    device: DevicePublic
    token: str = Field(description="shown once; only its hash is stored")
    public_key: str = Field(description="the cloud's Ed25519 key (base64) to pin on the device")
    key_id: str
    mqtt_url: str


class DeviceSelf(BaseModel):
    device: DevicePublic
    public_key: str
    key_id: str
    mqtt_url: str


class AuditPublic(Public):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    detail: dict[str, Any]
