"""Support for the desired-state tests: a cloud on any registry, tiny models, the broker's view."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from sqlalchemy import select

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls, mqtt_address
from cloud.fleet.desired import issue, set_deployment
from cloud.fleet.service import FleetService
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.tables import AuditEvent, Device
from cloud.settings import CloudSettings
from shared import topics
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN
from tests.fleet_harness import wait_for
from tests.onnx_models import tiny_classifier


def open_context(
    tmp_path: Path, *, database_url: str, mqtt_url: str, redis_url: str, **settings: Any
) -> CloudContext:
    """A cloud context of its own: its registry, its data dir, the given broker and Redis."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "cloud",
        "admin_token": ADMIN_TOKEN,
        "database_url": database_url,
        "chunk_size": 4096,
    }
    cloud_settings = CloudSettings(**(values | settings))
    return CloudContext.open(cloud_settings, ServiceUrls(database_url, mqtt_url, redis_url))


def add_models(context: CloudContext, names: tuple[str, ...], versions: int = 2) -> None:
    """Register ``versions`` tiny classifiers under each model name."""
    with context.database.session() as s:
        for index, name in enumerate(names):
            repository.create_model(s, name=name)
            for v in range(versions):
                data = tiny_classifier(features=4 + v, classes=3, seed=index)
                register_version(
                    s, context.artifacts, model_name=name, blocks=[data],
                    max_bytes=len(data), precision="fp32", actor="test",
                )  # fmt: skip


def enroll(context: CloudContext) -> str:
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    with context.database.session() as s:
        repository.enroll_device(s, device_id=device_id)
    return device_id


def sign_deployment(context: CloudContext, device_id: str, model: str, version: int) -> str:
    """Deploy ``model:version`` to the device and sign its document (a day's lifetime), as
    the keeper does, without publishing it; the signed document."""
    with context.database.session() as s:
        device = repository.lock_device(s, device_id=device_id)
        set_deployment(device=device, version=repository.get_version(s, model_name=model,
                                                                      version=version))  # fmt: skip
        issue(s, device=device, key=context.signing_key, lifetime=timedelta(days=1))
        assert device.desired_document is not None
        return device.desired_document


def audit_of(context: CloudContext, device_id: str, action: str) -> list[dict[str, Any]]:
    """The ``action`` audit details about ``device_id``, oldest first."""
    with context.database.session() as s:
        rows = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject == device_id, AuditEvent.action == action)
            .order_by(AuditEvent.id)
        )
        return [dict(r.detail, actor=r.actor) for r in rows]


@contextmanager
def running_fleet(context: CloudContext, device_ids: list[str]) -> Iterator[FleetService]:
    """The fleet service, connected; the devices' retained messages are cleared after."""
    fleet = FleetService(context)
    fleet.start()
    try:
        wait_for(lambda: fleet.link.connected, 15, "fleet service connection")
        yield fleet
    finally:
        fleet.stop()
        clear_desired(context, device_ids)


def clear_desired(context: CloudContext, device_ids: list[str] | None = None) -> None:
    """Clear the devices' retained desired documents on the broker (every enrolled device's
    when ``device_ids`` is None), so that no later test receives them."""
    if device_ids is None:
        with context.database.session() as s:
            device_ids = list(s.scalars(select(Device.id)))
    watcher = Watcher(context.urls.mqtt_url)
    try:
        for device_id in device_ids:
            watcher.clear(topics.device_topic(device_id, DeviceTopic.DESIRED))
    finally:
        watcher.close()


class Watcher:
    """A plain MQTT client on the devices' desired topics: what the broker holds and sends."""

    def __init__(self, mqtt_url: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        host, port = mqtt_address(mqtt_url)
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:8]}"
        )
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_args: self._subscribed.set()
        self._client.connect(host, port)
        self._client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, message.payload))

    def watch(self, topic_filter: str) -> None:
        """Subscribe and wait for the broker's SUBACK."""
        self._subscribed.clear()
        self._client.subscribe(topic_filter, qos=1)
        assert self._subscribed.wait(10), f"no SUBACK for {topic_filter}"

    def messages(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload in self.received if t == topic]

    def topics(self) -> set[str]:
        with self._lock:
            return {t for t, _payload in self.received}

    def put_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message, as an agent does with its reports and presence."""
        self._client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    def clear(self, topic: str) -> None:
        """Remove the retained message of ``topic`` (the machine's broker outlives tests)."""
        self._client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)

    def close(self) -> None:
        self._client.disconnect()  # first: it wakes the network loop, so the stop is prompt
        self._client.loop_stop()


def retained_desired(mqtt_url: str, device_id: str, timeout: float = 10.0) -> bytes:
    """What a device that connects now receives first on its desired topic (the retained)."""
    topic = topics.device_topic(device_id, DeviceTopic.DESIRED)
    watcher = Watcher(mqtt_url)
    try:
        watcher.watch(topic)
        payloads = wait_for(lambda: watcher.messages(topic), timeout, f"retained {topic}")
        return payloads[0]  # type: ignore[no-any-return]
    finally:
        watcher.close()


def flush_link(fleet: FleetService, mqtt_url: str) -> None:
    """Wait until the broker has taken everything the fleet service published so far: one
    connection keeps its order, so a marker published last is processed last."""
    marker = f"{topics.PREFIX}test/marker-{uuid.uuid4().hex[:8]}"
    watcher = Watcher(mqtt_url)
    try:
        watcher.watch(marker)
        assert fleet.link.publish(marker, b"1", qos=1)
        wait_for(lambda: watcher.messages(marker), 10, "the marker to come back")
    finally:
        watcher.close()
