"""Configured services are used as they are; unset ones start embedded, as children in
sessions of their own."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import redis

from cloud.embedded.processes import ChildProcess
from cloud.embedded.services import EmbeddedServices, ServiceUrls, mqtt_address
from shared.errors import ServiceUnavailable
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


def test_a_child_runs_in_its_own_session() -> None:
    """A terminal's Ctrl-C goes to our process group; a child in a session of its own is
    not in it, so it is stopped by us, after what uses it, not by the terminal."""
    child = ChildProcess([sys.executable, "-c", "import time; time.sleep(60)"])
    child.spawn()
    try:
        assert child.pid is not None
        assert os.getsid(child.pid) == child.pid
        assert os.getpgid(child.pid) != os.getpgid(0)
    finally:
        child.stop()
    assert not child.running


def test_stop_kills_a_child_that_ignores_sigterm() -> None:
    """SIGTERM first; a child that ignores it is killed once the wait runs out."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    child = ChildProcess([sys.executable, "-c", stubborn])
    child.spawn()
    assert child.process is not None
    process = child.process
    child.wait_until(lambda: _ignores_sigterm(process.pid), timeout=10, what="stubborn child")
    child.stop(timeout=0.5)
    assert process.returncode == -signal.SIGKILL


def test_waiting_for_a_child_that_exits_is_a_clear_error() -> None:
    child = ChildProcess([sys.executable, "-c", "raise SystemExit(3)"])
    child.spawn()
    with pytest.raises(ServiceUnavailable, match=r"exited \(3\)"):
        child.wait_until(lambda: False, timeout=10, what="short-lived")


def _ignores_sigterm(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False
