"""The agent's broker over TLS: an mqtts:// config with its CA validates and its agent comes
online on a TLS-only Mosquitto; a missing CA file is a configuration error at start."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_agent.agent import Agent
from edge_agent.cli import main
from shared import topics
from shared.messages import Presence, PresenceState
from shared.mqtt_link import MqttLink
from shared.mqtt_tls import MqttTls
from shared.topics import DeviceTopic
from tests.edge_agent.support import DEVICE, agent_settings
from tests.mosquitto import tls_mosquitto
from tests.pki import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def test_an_agent_configured_for_mqtts_comes_online_over_tls(tmp_path: Path, pki: Pki) -> None:
    """Its retained ``online`` reaches a watcher on the same TLS-only broker."""
    with tls_mosquitto(tmp_path / "broker", pki) as port:
        url = f"mqtts://localhost:{port}"
        settings = agent_settings(tmp_path / "agent", mqtt_url=url, mqtt_ca_file=pki.ca_file)
        assert settings.mqtt_tls == MqttTls(ca_file=pki.ca_file)
        seen: list[bytes] = []
        online = threading.Event()

        def on_presence(_topic: str, payload: bytes) -> None:
            seen.append(payload)
            if Presence.model_validate_json(payload).state == PresenceState.ONLINE:
                online.set()

        watcher = MqttLink(url, client_id="watcher", tls=MqttTls(ca_file=pki.ca_file))
        watcher.subscribe(topics.device_topic(DEVICE, DeviceTopic.PRESENCE), on_presence)
        agent = Agent(settings)
        agent.start(serve_api=False)
        watcher.start()
        try:
            assert agent.link.wait_connected(10)
            assert online.wait(10), seen
        finally:
            agent.stop()
            watcher.stop()


def test_a_missing_ca_file_is_a_configuration_error_at_start(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    """In the settings, and from `edge-agent run`: exit 2, one line, no traceback."""
    missing = tmp_path / "missing-ca.pem"
    with pytest.raises(ValidationError, match=r"MQTT CA file \S*missing-ca\.pem: No such file"):
        agent_settings(tmp_path, mqtt_url="mqtts://broker.example", mqtt_ca_file=missing)
    config = tmp_path / "agent.json"
    settings = agent_settings(tmp_path, mqtt_url="mqtts://broker.example")
    config.write_text(json.dumps(settings.model_dump(mode="json") | {"mqtt_ca_file": str(missing)}))
    assert main(["--config", str(config), "run"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert "missing-ca.pem: No such file" in err
    assert "Traceback" not in err


def test_tls_files_for_a_plain_broker_are_refused(tmp_path: Path, pki: Pki) -> None:
    """A CA file next to mqtt:// would be ignored, and tokens would cross in clear."""
    with pytest.raises(ValidationError, match=r"must be mqtts://"):
        agent_settings(tmp_path, mqtt_url="mqtt://broker.example", mqtt_ca_file=pki.ca_file)
    with pytest.raises(ValidationError, match="unsupported MQTT URL"):
        agent_settings(tmp_path, mqtt_url="ws://broker.example")
