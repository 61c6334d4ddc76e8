"""Broker restarts (reconnect, no stampede), HTTP Range delivery, and `edge-agent enroll`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from cloud.embedded.services import EmbeddedServices
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared import topics
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from shared.signing import generate_key, public_key_b64
from shared.topics import DeviceTopic
from tests.fleet_harness import Cloud, wait_for


def _presence_watcher(url: str, device_id: str) -> tuple[mqtt.Client, list[str]]:
    seen: list[str] = []
    host, port = url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:6]}"
    )
    client.on_message = lambda _c, _u, m: seen.append(
        json.loads(m.payload)["state"] if m.payload else ""
    )
    client.on_connect = lambda c, *_: c.subscribe(
        topics.device_topic(device_id, DeviceTopic.PRESENCE), 1
    )
    client.connect(host, int(port))
    client.loop_start()
    return client, seen


def test_agent_reconnects_after_a_broker_restart(tmp_path: Path) -> None:
    """Stop the broker under a running agent, start it again on the same port: the agent
    comes back by itself, says online again, and its Last Will had said offline meanwhile."""
    with EmbeddedServices(
        data_dir=tmp_path / "b", database_url="sqlite://", mqtt_url=None, redis_url="redis://unused",
        broker="rumqttd",
    ) as services:  # fmt: skip
        assert services.urls is not None
        url = services.urls.mqtt_url
        broker = services.children["mqtt"]
        settings = AgentSettings(
            device_id="restart-1", token="t" * 16, cloud_url="http://127.0.0.1:9",
            mqtt_url=url, public_key=public_key_b64(generate_key().public_key()),
            data_dir=tmp_path / "agent",
        )  # fmt: skip
        agent = Agent(settings)
        agent.link.backoff = Backoff(base=0.2, cap=1.0)
        agent.start(serve_api=False)
        try:
            wait_for(lambda: agent.link.connected, 10, "first connection")
            argv = broker.argv
            broker.stop()
            wait_for(lambda: not agent.link.connected, 10, "agent notices the outage")
            broker.argv = argv
            broker.start(host="127.0.0.1", port=int(url.rsplit(":", 1)[1]))
            watcher, seen = _presence_watcher(url, "restart-1")
            wait_for(lambda: agent.link.connected, 15, "reconnection")
            wait_for(lambda: "online" in seen, 10, "online again")
            assert agent.link.stats.connects >= 2
            assert agent.link.stats.reconnect_delays
            watcher.loop_stop()
            watcher.disconnect()
        finally:
            agent.stop()


def test_a_fleet_reconnecting_is_spread_out_by_jitter(tmp_path: Path) -> None:
    """20 links to a broker that is down: their retry delays differ (full jitter) and stay
    under the exponential ceiling — no synchronized stampede when it comes back."""
    links = [
        MqttLink("mqtt://127.0.0.1:9", client_id=f"j{i}", backoff=Backoff(base=0.05, cap=0.4))
        for i in range(20)
    ]
    for link in links:
        link.start()
    time.sleep(1.5)
    for link in links:
        link.stop(timeout=1)
    firsts = [link.stats.reconnect_delays[:3] for link in links]
    assert all(len(d) == 3 for d in firsts)
    for attempt in range(3):
        column = [d[attempt] for d in firsts]
        assert len(set(column)) == 20
        assert max(column) <= Backoff(base=0.05, cap=0.4).ceiling(attempt)
        assert max(column) - min(column) > 0.3 * Backoff(base=0.05, cap=0.4).ceiling(attempt)


def test_http_range_delivery_is_the_alternative(
    embedded_cloud: Cloud, reference_onnx: dict[str, bytes], agent_dir: Path
) -> None:
    version = embedded_cloud.register("digits-edge", reference_onnx["digits-edge"])
    agent = embedded_cloud.start_agent(
        embedded_cloud.agent_settings(agent_dir, download_via="http")
    )
    with embedded_cloud.admin() as c:
        c.put(f"/v1/devices/{agent.device_id}/deployments/digits-edge", json={"version": version})
    embedded_cloud.wait_state(agent.device_id, "ACTIVE", version)
    assert embedded_cloud.fleet.chunks.requests == 0  # nothing went over MQTT
    assert agent.infer("digits-edge", {"input": np.zeros((1, 64), np.float32)}).version == version


def test_edge_agent_enroll_stores_identity_and_pins_the_key(
    embedded_cloud: Cloud, tmp_path: Path
) -> None:
    device_id, enrolled = embedded_cloud.enroll()
    data_dir = tmp_path / "device"
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "--data-dir", str(data_dir), "enroll",
         "--cloud", embedded_cloud.url, "--token", enrolled["token"]],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((data_dir / "agent.json").read_text())
    assert config["device_id"] == device_id
    assert config["public_key"] == enrolled["public_key"]
    assert (data_dir / "agent.json").stat().st_mode & 0o777 == 0o600
    status = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "--data-dir", str(data_dir), "status"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert json.loads(status.stdout)["active"] == {}
    refused = subprocess.run(
        [sys.executable, "-m", "edge_agent.cli", "--data-dir", str(tmp_path / "x"), "enroll",
         "--cloud", embedded_cloud.url, "--token", "efd_wrong"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert not (tmp_path / "x" / "agent.json").exists()
