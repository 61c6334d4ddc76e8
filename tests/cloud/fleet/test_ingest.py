"""The fleet service's ingest through a real Mosquitto (the shipped limits): nothing a device
reports is lost while the cloud restarts, and a bad message never blocks the good ones."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.registry.tables import Device
from shared.topics import DeviceTopic
from tests.conftest import serve_in_thread
from tests.fleet_harness import wait_for
from tests.ingest_support import Devices, cloud_context, started_fleet, stored_events
from tests.mosquitto import mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    with mosquitto(tmp_path / "broker") as port:
        yield port


@pytest.fixture
def context(
    tmp_path: Path, database_url: str, broker: int, embedded: ServiceUrls
) -> Iterator[CloudContext]:
    ctx = cloud_context(tmp_path, database_url, f"mqtt://127.0.0.1:{broker}", embedded.redis_url)
    yield ctx
    ctx.close()


def test_reports_sent_while_the_cloud_is_down_are_all_stored(
    context: CloudContext, broker: int
) -> None:
    """Stop the cloud, five devices publish 500 status events, start the cloud: all 500 are
    in SQL (its session, kept by the broker under a stable client id, held them)."""
    started_fleet(context).stop()
    devices = Devices(context, broker, 5)
    try:
        for index in range(500):
            device_id = devices.ids[index % 5]
            devices.publish(device_id, DeviceTopic.STATUS, devices.status(device_id, index))
        fleet = started_fleet(context)
        try:
            wait_for(lambda: stored_events(context) >= 500, 30, "500 stored events")
            assert stored_events(context) == 500
            assert {d: stored_events(context, d) for d in devices.ids} == dict.fromkeys(
                devices.ids, 100
            )
            assert fleet.ingest.snapshot().dropped == {}
        finally:
            fleet.stop(forget_session=True)
    finally:
        devices.close()


def test_a_malformed_message_is_dropped_once_and_the_next_one_stored(
    context: CloudContext, broker: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A report that can never be stored is logged and acked (not redelivered to the next
    session); the report after it is stored; so is a status with a field from the future."""
    devices = Devices(context, broker, 1)
    device_id = devices.ids[0]
    fleet = started_fleet(context)
    try:
        with caplog.at_level(logging.WARNING, "cloud.fleet.ingest"):
            devices.publish(device_id, DeviceTopic.STATUS, b"{not json")
            newer = json.loads(devices.status(device_id, 1)) | {"added_in_v1_9": {"x": 1}}
            devices.publish(device_id, DeviceTopic.STATUS, json.dumps(newer))
            wait_for(lambda: stored_events(context, device_id) == 1, 10, "the good report")
        assert fleet.ingest.snapshot().dropped == {"malformed": 1}
        assert "malformed" in caplog.text
        fleet.stop()
        fleet = started_fleet(context)
        devices.publish(device_id, DeviceTopic.STATUS, devices.status(device_id, 2))
        wait_for(lambda: stored_events(context, device_id) == 2, 10, "the report after the restart")
        assert fleet.ingest.snapshot().dropped == {}
    finally:
        fleet.stop(forget_session=True)
        devices.close()


def test_reports_from_unknown_devices_do_not_block_the_queue(
    context: CloudContext, broker: int
) -> None:
    """Fifty reports from a device the registry does not know, then one from a known device:
    the known one is stored, the others dropped (and acked), and presence is recorded."""
    devices = Devices(context, broker, 1)
    device_id = devices.ids[0]
    fleet = started_fleet(context)
    try:
        for index in range(50):
            devices.publish("stranger", DeviceTopic.STATUS, devices.status("stranger", index))
        devices.publish(device_id, DeviceTopic.PRESENCE, b'{"state": "online"}')
        devices.publish(device_id, DeviceTopic.STATUS, devices.status(device_id, 0))
        wait_for(lambda: stored_events(context, device_id) == 1, 10, "the known device's report")
        assert fleet.ingest.snapshot().dropped == {"unknown_device": 50}
        with context.database.session() as s:
            device = s.get(Device, device_id)
            assert device is not None
            assert device.presence == "online"
            assert device.last_seen_at is not None
        assert stored_events(context) == 1
    finally:
        fleet.stop(forget_session=True)
        devices.close()


def test_the_brokers_drops_are_in_the_log_and_in_metrics(
    tmp_path: Path, embedded: ServiceUrls, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker that drops messages (here: a tiny queue for a session that is away) says so
    in $SYS; the cloud turns it into a warning and into /metrics, next to its backlog."""
    with mosquitto(tmp_path / "small", max_queued_messages=5, sys_interval=1) as port:
        url = f"mqtt://127.0.0.1:{port}"
        context = cloud_context(tmp_path, f"sqlite:///{tmp_path / 'r.db'}", url, embedded.redis_url)
        away = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="away", clean_session=False)
        away.connect("127.0.0.1", port)
        away.subscribe("edgefleet/v1/test/#", qos=1)
        away.loop(0.5)
        away.disconnect()
        fleet = started_fleet(context)
        devices = Devices(context, port, 0)
        try:
            with caplog.at_level(logging.WARNING, "cloud.fleet.watch"):
                for _ in range(20):
                    info = devices.client.publish("edgefleet/v1/test/x", b"x", qos=1)
                    info.wait_for_publish(10)
                wait_for(lambda: fleet.broker.dropped_seen >= 15, 15, "the broker's drop count")
            assert "the broker dropped" in caplog.text
            with serve_in_thread(create_app(context, fleet)) as api:
                text = httpx.get(f"{api}/metrics", timeout=10).text
            assert "edgefleet_broker_drops_seen_total 15.0" in text
            assert 'edgefleet_broker_sys{stat="dropped"} 15.0' in text
            assert "edgefleet_ingest_queue_depth 0.0" in text
            assert "edgefleet_ingest_oldest_message_age_seconds" in text
        finally:
            devices.close()
            fleet.stop()
            context.close()
