"""FleetService: publishes desired state, serves artifact chunks, ingests what devices say
(presence, reported state, deployment status, telemetry) into SQL history and Redis."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime

from sqlalchemy import select

from cloud.context import CloudContext
from cloud.fleet.chunks import ChunkBroadcaster
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.registry import repository
from cloud.registry.tables import Artifact, DeploymentEvent
from shared import topics
from shared.errors import NotFound
from shared.messages import (
    ArtifactRequest,
    DesiredState,
    Presence,
    ReportedState,
    StatusEvent,
    Telemetry,
    decode,
)
from shared.mqtt_link import Handler, MqttLink
from shared.topics import DeviceTopic

__all__ = ["FleetService"]

_LOGGER = logging.getLogger(__name__)
TELEMETRY_TTL_S = 3600


class FleetService:
    def __init__(self, context: CloudContext) -> None:
        self.context = context
        self.link = MqttLink(
            context.urls.mqtt_url,
            client_id=f"edgefleet-cloud-{uuid.uuid4().hex[:8]}",
            username=context.settings.mqtt_username,
            password=context.settings.mqtt_password,
            on_connected=self._republish_desired,
        )
        self.chunks = ChunkBroadcaster(
            context.artifacts,
            lambda topic, payload: self.link.publish(topic, payload, qos=1),
            chunk_size_of=self._chunk_size,
        )
        self._chunk_sizes: dict[str, int] = {}
        self.desired = DesiredStateKeeper(
            context, lambda topic, doc: self.link.publish(topic, doc, retain=True)
        )
        self.handlers: dict[DeviceTopic, Handler] = {
            DeviceTopic.STATUS: self._on_status,
            DeviceTopic.PRESENCE: self._on_presence,
            DeviceTopic.REPORTED: self._on_reported,
            DeviceTopic.TELEMETRY: self._on_telemetry,
            DeviceTopic.ARTIFACT_REQUEST: self._on_artifact_request,
        }

    def start(self, *, timeout: float = 10.0) -> None:
        for kind, handler in self.handlers.items():
            self.link.subscribe(topics.fleet_filter(kind), self._known_devices_only(handler), qos=1)
        self.chunks.start()
        self.desired.start()
        self.link.start()
        if not self.link.wait_connected(timeout):
            _LOGGER.warning("fleet service not connected to the broker yet; retrying in background")

    def stop(self) -> None:
        self.desired.stop()
        self.chunks.stop()
        self.link.stop()

    @staticmethod
    def _known_devices_only(handler: Handler) -> Handler:
        """A message from a device the registry does not know is a warning, not a trace."""

        def guarded(topic: str, payload: bytes) -> None:
            try:
                handler(topic, payload)
            except NotFound as exc:
                _LOGGER.warning("ignored %s: %s", topic, exc.message)

        return guarded

    # -- desired state -------------------------------------------------------------------

    def deploy(
        self, *, device_id: str, model: str, version: int, rollout_id: int | None = None
    ) -> DesiredState:
        """Point ``device_id`` at ``model:version``: a new rev, signed and stored in SQL under
        the device's row lock, then published (see ``DesiredStateKeeper``)."""
        return self.desired.deploy(
            device_id=device_id, model=model, version=version, rollout_id=rollout_id
        )

    def _republish_desired(self) -> None:
        """Retained documents die with a broker that keeps nothing: give them back from SQL
        (on the keeper's thread, not on the network thread that calls this)."""
        self.desired.request_republish()

    # -- artifacts -----------------------------------------------------------------------

    def _chunk_size(self, sha256: str) -> int | None:
        size = self._chunk_sizes.get(sha256)
        if size is None:
            with self.context.database.session() as s:
                artifact = s.get(Artifact, sha256)
                if artifact is None:
                    return None
                size = self._chunk_sizes[sha256] = artifact.chunk_size
        return size

    def _on_artifact_request(self, topic: str, payload: bytes) -> None:
        topics.parse(topic)
        self.chunks.request(decode(ArtifactRequest, payload))

    # -- ingest --------------------------------------------------------------------------

    def _device(self, topic: str) -> str:
        device_id = topics.parse(topic).device_id
        assert device_id is not None
        return device_id

    def _on_status(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        event = decode(StatusEvent, payload)
        with self.context.database.session() as s:
            repository.touch_device(s, device_id=device_id)
            s.add(
                DeploymentEvent(
                    device_id=device_id, rev=event.rev, rollout_id=event.rollout_id,
                    model=event.model, version=event.version, state=event.state.value,
                    reason=event.reason, bytes_done=event.bytes_done,
                    bytes_total=event.bytes_total, at=event.at,
                )
            )  # fmt: skip
        self.context.redis.hset(
            f"edgefleet:device:{device_id}", "last_status", event.model_dump_json()
        )

    def _on_presence(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if not payload:
            return
        presence = decode(Presence, payload)
        with self.context.database.session() as s:
            repository.touch_device(s, device_id=device_id, presence=presence.state.value)
        self.context.redis.hset(
            f"edgefleet:device:{device_id}",
            mapping={"presence": presence.state.value, "seen": datetime.now(UTC).isoformat()},
        )

    def _on_reported(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        if not payload:
            return
        reported = decode(ReportedState, payload)
        with self.context.database.session() as s:
            device = repository.touch_device(s, device_id=device_id)
            device.reported = reported.model_dump(mode="json")
        self.context.redis.hset(
            f"edgefleet:device:{device_id}", "reported", reported.model_dump_json()
        )

    def _on_telemetry(self, topic: str, payload: bytes) -> None:
        device_id = self._device(topic)
        telemetry = decode(Telemetry, payload)
        key = f"edgefleet:telemetry:{device_id}"
        self.context.redis.set(key, telemetry.model_dump_json(), ex=TELEMETRY_TTL_S)
        self.context.redis.hincrby("edgefleet:telemetry:messages", device_id, 1)

    def events(self, device_id: str, limit: int = 100) -> list[dict[str, object]]:
        with self.context.database.session() as s:
            rows = s.scalars(
                select(DeploymentEvent)
                .where(DeploymentEvent.device_id == device_id)
                .order_by(DeploymentEvent.id.desc())
                .limit(limit)
            )
            return [
                StatusEvent.model_validate(
                    {
                        "rev": r.rev,
                        "rollout_id": r.rollout_id,
                        "model": r.model,
                        "version": r.version,
                        "state": r.state,
                        "reason": r.reason,
                        "bytes_done": r.bytes_done,
                        "bytes_total": r.bytes_total,
                        "at": r.at,
                    }
                ).model_dump(mode="json")
                for r in rows
            ]
