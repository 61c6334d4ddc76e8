"""The cloud and a device that reach the broker only over TLS: the shipped dynsec.conf with
its TLS lines in use, a CA made by the test, every broker connection over mqtts://."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.api.app import create_app
from cloud.broker.provisioning import DynsecAccounts
from cloud.embedded.services import ServiceUrls
from cloud.fleet.service import FleetService
from edge_agent.agent import Agent
from edge_agent.cli import main as edge_agent
from edge_agent.config import load_settings
from shared.errors import ServiceUnavailable
from shared.mqtt_tls import MqttTls
from tests.brokers import DynsecBroker, dynsec_cloud_context, dynsec_mosquitto
from tests.conftest import RunningApi, serve_in_thread
from tests.fleet_harness import wait_for
from tests.pki import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def broker(tmp_path: Path, pki: Pki) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker", tls=pki) as running:
        yield running


def test_a_cloud_and_an_agent_use_the_tls_broker_end_to_end(
    tmp_path: Path, pki: Pki, broker: DynsecBroker, embedded: ServiceUrls
) -> None:
    """Enrollment provisions the device's login over TLS; both fleet links connect over TLS;
    `edge-agent enroll --mqtt-ca-file` writes a config whose agent comes online, as the cloud
    sees; readiness reaches the broker at its mqtts:// address."""
    assert broker.url.startswith("mqtts://")
    with dynsec_cloud_context(tmp_path / "cloud", broker, embedded.redis_url) as context:
        context.redis.flushdb()
        assert context.settings.mqtt_tls == MqttTls(ca_file=pki.ca_file)
        fleet = FleetService(context)
        fleet.start()
        agent: Agent | None = None
        try:
            assert fleet.link.wait_connected(10)
            assert fleet.broker_link.wait_connected(10)
            with serve_in_thread(create_app(context, fleet)) as url:
                api = RunningApi(url, context)
                with api.client() as c:
                    enrolled = c.post("/v1/devices", json={"device_id": "cam-tls"})
                    assert enrolled.status_code == 201, enrolled.text
                    assert enrolled.json()["mqtt_url"] == broker.url
                    assert c.get("/readyz").json()["checks"]["mqtt"] == "ok"
                token_file = tmp_path / "token"
                token_file.write_text(enrolled.json()["token"])
                config = tmp_path / "agent" / "agent.json"
                assert edge_agent([
                    "--data-dir", str(tmp_path / "agent"), "enroll", "--cloud", url,
                    "--token-file", str(token_file), "--mqtt-ca-file", str(pki.ca_file),
                ]) == 0  # fmt: skip
                assert json.loads(config.read_text())["mqtt_ca_file"] == str(pki.ca_file.resolve())
                agent = Agent(load_settings(config))
                agent.start(serve_api=False)
                assert agent.link.wait_connected(10)
                wait_for(
                    lambda: context.redis.hget("edgefleet:device:cam-tls", "presence") == b"online",
                    15,
                    "the cloud to see the agent online",
                )
        finally:
            if agent is not None:
                agent.stop()
            fleet.stop()


def test_provisioning_with_another_ca_is_a_clear_service_unavailable(
    tmp_path: Path, broker: DynsecBroker
) -> None:
    """A cloud that does not trust the broker's certificate does not send it its login."""
    stranger = make_pki(tmp_path / "stranger")
    accounts = DynsecAccounts(
        broker.url,
        username=broker.cloud_username,
        password=broker.cloud_password,
        tls=MqttTls(ca_file=stranger.ca_file),
    )
    with pytest.raises(ServiceUnavailable, match=r"TLS with the MQTT broker at \S+ failed"):
        accounts.provision_device("cam-1", "token-1")
