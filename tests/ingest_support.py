"""Helpers for tests of the fleet service's ingest through a real broker: a cloud context on
a given broker, enrolled devices that publish through one plain paho client, counts."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
from sqlalchemy import func, select

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.fleet.service import FleetService
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent
from cloud.settings import CloudSettings
from shared import topics
from shared.messages import DeploymentState, StatusEvent
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN

__all__ = ["Devices", "cloud_context", "started_fleet", "stored_events"]


def cloud_context(tmp_path: Path, database_url: str, mqtt_url: str, redis_url: str) -> CloudContext:
    settings = CloudSettings(
        data_dir=tmp_path / "cloud", admin_token=ADMIN_TOKEN, database_url=database_url
    )
    context = CloudContext.open(settings, ServiceUrls(database_url, mqtt_url, redis_url))
    context.redis.flushdb()
    return context


class Devices:
    """Enrolled devices that speak through one plain paho client (QoS 1, as agents do)."""

    def __init__(self, context: CloudContext, port: int, count: int) -> None:
        self.context = context
        self.ids = [f"dev-{uuid.uuid4().hex[:8]}" for _ in range(count)]
        with context.database.session() as s:
            for device_id in self.ids:
                repository.enroll_device(s, device_id=device_id)
        connected = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"devices-{uuid.uuid4().hex[:6]}"
        )
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert connected.wait(10)

    def publish(self, device_id: str, kind: DeviceTopic, payload: bytes | str) -> None:
        info = self.client.publish(topics.device_topic(device_id, kind), payload, qos=1)
        info.wait_for_publish(10)

    def status(self, device_id: str, index: int) -> str:
        return StatusEvent(
            rev=1, model="m", version=1, state=DeploymentState.DOWNLOADING,
            bytes_done=index, bytes_total=1000, at=datetime.now(UTC),
        ).model_dump_json()  # fmt: skip

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stored_events(context: CloudContext, device_id: str | None = None) -> int:
    with context.database.session() as s:
        query = select(func.count()).select_from(DeploymentEvent)
        if device_id is not None:
            query = query.where(DeploymentEvent.device_id == device_id)
        return int(s.scalar(query) or 0)


def started_fleet(context: CloudContext) -> FleetService:
    fleet = FleetService(context)
    fleet.start()
    assert fleet.link.wait_subscribed(10), "the fleet service's subscriptions"
    return fleet
