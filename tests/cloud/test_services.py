"""Configured services are used as they are; unset ones start embedded."""

from __future__ import annotations

from pathlib import Path

import paho.mqtt.client as mqtt
import redis

from cloud.embedded.services import EmbeddedServices, ServiceUrls, mqtt_address
from tests.services import MOSQUITTO, REDIS, need


def test_configured_urls_start_nothing(tmp_path: Path) -> None:
    need(MOSQUITTO)
    need(REDIS)
    with EmbeddedServices(
        data_dir=tmp_path,
        database_url="sqlite://",
        mqtt_url="mqtt://127.0.0.1:1883",
        redis_url="redis://127.0.0.1:6379/0",
    ) as services:
        assert services.children == {}
        assert services.urls is not None
        assert services.urls.embedded == []


def test_the_embedded_broker_and_redis_are_real(embedded: ServiceUrls) -> None:
    """A retained 1 MiB message goes through the embedded broker; Redis answers SET/GET."""
    r = redis.Redis.from_url(embedded.redis_url)
    r.set("k", "v")
    assert r.get("k") == b"v"
    host, port = mqtt_address(embedded.mqtt_url)
    payload = bytes(range(256)) * 4096
    got: list[bytes] = []
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="pub")
    pub.connect(host, port)
    pub.loop_start()
    pub.publish("edgefleet/test/big", payload, qos=1, retain=True).wait_for_publish(10)
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sub")
    sub.on_message = lambda _c, _u, msg: got.append(msg.payload)
    sub.connect(host, port)
    sub.subscribe("edgefleet/test/big", qos=1)
    sub.loop_start()
    import time

    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.05)
    for client in (pub, sub):
        client.loop_stop()
        client.disconnect()
    assert got == [payload]
