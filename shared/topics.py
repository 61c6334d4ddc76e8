"""MQTT topic templates and parsers: no topic string is written anywhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import ProtocolError

__all__ = [
    "CLOUD_BUDGET",
    "PREFIX",
    "DeviceTopic",
    "ParsedTopic",
    "artifact_chunk",
    "artifact_chunks_filter",
    "device_topic",
    "fleet_filter",
    "parse",
    "validate_device_id",
    "validate_sha256",
]

PREFIX = "edgefleet/v1/"
# Cloud replicas in one group split device topics (DESIGN.md §3, the cloud's session).
SHARED_GROUP = "$share/edgefleet-cloud/"

# The cloud's offload budget for every device (DESIGN.md §3): QoS 1, retained; an empty
# retained payload clears it.
CLOUD_BUDGET = f"{PREFIX}cloud/budget"

_DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DeviceTopic(StrEnum):
    """The per-device topics of DESIGN.md §3 (`edgefleet/v1/dev/{id}/<kind>`)."""

    DESIRED = "desired"
    REPORTED = "reported"
    STATUS = "status"
    PRESENCE = "presence"
    TELEMETRY = "telemetry"
    ARTIFACT_REQUEST = "artifact/req"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A topic taken apart: a device topic, or an artifact chunk."""

    kind: DeviceTopic | None
    device_id: str | None = None
    sha256: str | None = None
    chunk_index: int | None = None


def validate_device_id(device_id: str) -> str:
    """Return ``device_id`` if it is safe inside a topic and a file name, else raise."""
    if not _DEVICE_ID.fullmatch(device_id):
        raise ProtocolError(
            f"invalid device id {device_id!r}: 1-64 of letters, digits, '_', '.', '-'"
        )
    return device_id


def validate_sha256(sha256: str) -> str:
    if not _SHA256.fullmatch(sha256):
        raise ProtocolError(f"invalid sha256 {sha256!r}: 64 lowercase hex digits")
    return sha256


def device_topic(device_id: str, kind: DeviceTopic) -> str:
    return f"{PREFIX}dev/{validate_device_id(device_id)}/{kind.value}"


def fleet_filter(kind: DeviceTopic, *, shared: bool = False) -> str:
    """The subscription filter for one kind of topic from every device.

    ``shared=True`` gives the `$share/edgefleet-cloud/…` form so cloud replicas split the
    ingest.
    """
    topic = f"{PREFIX}dev/+/{kind.value}"
    return f"{SHARED_GROUP}{topic}" if shared else topic


def device_filter(device_id: str) -> str:
    """Everything under one device's scope (what its ACL allows)."""
    return f"{PREFIX}dev/{validate_device_id(device_id)}/#"


def artifact_chunk(sha256: str, index: int) -> str:
    if index < 0:
        raise ProtocolError(f"invalid chunk index {index}")
    return f"{PREFIX}artifacts/{validate_sha256(sha256)}/{index}"


def artifact_chunks_filter(sha256: str) -> str:
    return f"{PREFIX}artifacts/{validate_sha256(sha256)}/+"


_BY_SUFFIX = {kind.value: kind for kind in DeviceTopic}


def parse(topic: str) -> ParsedTopic:
    """Parse an EdgeFleet topic; raise :class:`ProtocolError` for anything else."""
    if not topic.startswith(PREFIX):
        raise ProtocolError(f"not an EdgeFleet topic: {topic!r}")
    rest = topic[len(PREFIX) :]
    parts = rest.split("/")
    if parts[0] == "dev" and len(parts) >= 3:
        device_id = validate_device_id(parts[1])
        kind = _BY_SUFFIX.get("/".join(parts[2:]))
        if kind is None:
            raise ProtocolError(f"unknown device topic: {topic!r}")
        return ParsedTopic(kind=kind, device_id=device_id)
    if parts[0] == "artifacts" and len(parts) == 3:
        sha256 = validate_sha256(parts[1])
        if not parts[2].isdigit():
            raise ProtocolError(f"invalid chunk index in {topic!r}")
        return ParsedTopic(kind=None, sha256=sha256, chunk_index=int(parts[2]))
    raise ProtocolError(f"unknown topic: {topic!r}")
