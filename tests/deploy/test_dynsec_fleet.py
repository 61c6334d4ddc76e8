"""The whole fleet path on a broker with per-device logins: a real agent, enrolled through
the API, comes online, fetches a model over MQTT chunks, activates it and reports it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.api.app import create_app
from cloud.embedded.services import ServiceUrls
from cloud.fleet.service import FleetService
from tests.brokers import DynsecBroker, dynsec_cloud_context, dynsec_mosquitto
from tests.conftest import serve_in_thread
from tests.fleet_harness import Cloud, wait_for


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def cloud(tmp_path: Path, embedded: ServiceUrls, broker: DynsecBroker) -> Iterator[Cloud]:
    """Like tests.fleet_harness.running_cloud, less its anonymous clean-up of retained
    messages (refused here; the broker is this test's alone)."""
    with dynsec_cloud_context(tmp_path / "cloud", broker, embedded.redis_url) as context:
        context.redis.flushdb()
        fleet = FleetService(context)
        fleet.start()
        try:
            with serve_in_thread(create_app(context, fleet)) as url:
                running = Cloud(context, fleet, url)
                try:
                    yield running
                finally:
                    for agent in running.agents:
                        agent.stop()
        finally:
            fleet.stop()


def test_an_agent_with_its_own_login_receives_and_activates_a_model(
    cloud: Cloud, broker: DynsecBroker, reference_onnx: dict[str, bytes], tmp_path: Path
) -> None:
    version = cloud.register("digits-edge", reference_onnx["digits-edge"])
    agent = cloud.start_agent(cloud.agent_settings(tmp_path / "agents", "cam-1"))
    live_key = "edgefleet:device:cam-1"
    wait_for(lambda: cloud.context.redis.hget(live_key, "presence") == b"online", 15, "online")
    with cloud.admin() as c:
        r = c.put("/v1/devices/cam-1/deployments/digits-edge", json={"version": version})
    assert r.status_code == 202, r.text
    cloud.wait_state(agent.device_id, "ACTIVE", version, timeout=60)
    # It logged in as itself: its device id, its token, its bound client id.
    assert re.search(r"connected from .* as agent-cam-1 \(.*u'cam-1'\)", broker.log())
