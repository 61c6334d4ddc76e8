"""`make demo` on a machine with Mosquitto runs its broker with per-device logins: nobody gets
in without one, and a device's login reaches only its own topics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import psutil
import pytest

from cloud.cli import broker_note
from cloud.embedded.services import EmbeddedBroker, ServiceUrls
from cloud.settings import CloudSettings
from shared.topics import DeviceTopic, device_filter, device_topic
from tests.brokers import MqttProbe, mosquitto_with_plugin
from tests.integration.test_demo import READY_LINE, Demo, start_demo, stop_demo


def _mosquitto_sub() -> str:
    """The mosquitto_sub client; skip (or fail under CI) where it is not installed."""
    found = shutil.which("mosquitto_sub")
    if found is None:
        reason = "mosquitto_sub (package mosquitto-clients) is not installed"
        if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    return found


def _agent_config(tmp_path: Path, device_id: str) -> dict[str, Any]:
    """What `edge-agent enroll` wrote for the device: its id, token, broker URL."""
    path = tmp_path / "demo" / "agents" / device_id / "agent.json"
    return dict(json.loads(path.read_text()))


def _agent_process(demo: Demo, device_id: str) -> psutil.Process:
    for process in demo.tree()[1:]:
        cmdline = process.cmdline()
        if "run" in cmdline and any(device_id in arg for arg in cmdline):
            return process
    raise AssertionError(f"no `edge-agent run` process for {device_id}")


def test_a_fresh_demo_gives_each_device_its_own_broker_login(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A fresh demo on this machine's Mosquitto: both agents serve the INT8 model, enrolled
    with broker logins. `mosquitto_sub -t '#'` without a login is refused; demo-agent-1's
    login works only with its own client id, and then reads its own topics but none of
    demo-agent-2's. Ctrl-C on the process group still ends it cleanly."""
    mosquitto_with_plugin()
    mosquitto_sub = _mosquitto_sub()
    demo = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "2")
    try:
        demo.wait_for(READY_LINE)
        assert "per-device logins on" in demo.text
        assert "demo-agent-1 serves it" in demo.text, demo.text
        assert "demo-agent-2 serves it" in demo.text, demo.text
        port = demo.broker_port()

        anonymous = subprocess.run(
            [mosquitto_sub, "-h", "127.0.0.1", "-p", str(port), "-t", "#", "-C", "1", "-W", "3"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        assert anonymous.returncode != 0
        assert "not authorised" in anonymous.stdout + anonymous.stderr

        config = _agent_config(tmp_path, "demo-agent-1")
        assert config["mqtt_url"] == f"mqtt://127.0.0.1:{port}"
        stranger = MqttProbe(port, "demo-agent-1", config["token"])
        try:
            assert not stranger.connect(), "a device's login works only with its client id"
        finally:
            stranger.close()

        # Its own client id takes the agent's session over: paused, the agent cannot take
        # it back while we look, and it reconnects once resumed.
        agent = _agent_process(demo, "demo-agent-1")
        agent.suspend()
        probe = MqttProbe(port, "demo-agent-1", config["token"], client_id="agent-demo-agent-1")
        try:
            assert probe.connect()
            for theirs in (device_filter("demo-agent-2"), "edgefleet/v1/dev/+/desired", "#"):
                assert not probe.subscribe(theirs), f"demo-agent-1 may subscribe to {theirs}"
            assert probe.subscribe(device_filter("demo-agent-1"))
            # Its own retained desired state comes; the broker answers a client's
            # subscriptions in order, so what the refused ones could have brought (the other
            # device's retained documents) would have come before it.
            desired = device_topic("demo-agent-1", DeviceTopic.DESIRED)
            assert probe.wait(lambda: any(t == desired for t, _ in probe.messages))
            mine = device_filter("demo-agent-1").removesuffix("#")
            assert all(topic.startswith(mine) for topic, _ in probe.messages), probe.messages
        finally:
            probe.close()
            agent.resume()

        demo.interrupt()
        assert demo.proc.returncode == 0, demo.text
        demo.assert_no_traceback()
    finally:
        stop_demo(demo)


def test_devices_enrolled_without_logins_get_them_when_the_demo_moves_to_mosquitto(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A demo run on rumqttd says plainly that its broker has no authentication, and its
    device gets no broker login. Started again on the same data dir where Mosquitto is
    installed, the demo re-enrolls that device (a new token, which is its login), and the
    broker lets the agent in."""
    mosquitto_with_plugin()
    first = start_demo(
        tmp_path, reference_onnx, "--duration", "0.5", "--agents", "1",
        env={"EDGEFLEET_EMBEDDED_BROKER": "rumqttd"},
    )  # fmt: skip
    try:
        first.rest(timeout=60)
        assert first.proc.returncode == 0, first.text
        assert "embedded rumqttd: this broker has NO authentication" in first.text
    finally:
        stop_demo(first)
    old_token = _agent_config(tmp_path, "demo-agent-1")["token"]

    restarted = datetime.now(UTC)
    again = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "1")
    try:
        again.wait_for(READY_LINE)
        assert "per-device logins on" in again.text
        assert "demo-agent-1 has no broker login" in again.text
        again.seen_since("demo-agent-1", restarted)
        config = _agent_config(tmp_path, "demo-agent-1")
        assert config["token"] != old_token
        again.interrupt()
        assert again.proc.returncode == 0, again.text
    finally:
        stop_demo(again)


@pytest.mark.parametrize(
    ("broker", "accounts", "says"),
    [
        ("mosquitto", "dynsec", "per-device logins on"),
        ("rumqttd", "none", "NO authentication"),
        (None, "dynsec", "per-device logins provisioned at enrollment"),
        (None, "none", ""),
    ],
)
def test_the_banner_says_who_may_use_the_broker(
    broker: EmbeddedBroker | None, accounts: Literal["none", "dynsec"], says: str
) -> None:
    """The banner's MQTT line names the embedded broker and whether it has logins; of a
    configured broker it says only what the cloud provisions."""
    urls = ServiceUrls("sqlite://", "mqtt://127.0.0.1:1", "redis://127.0.0.1:1", [], broker)
    settings = CloudSettings(
        dev_mode=True, broker_accounts=accounts, mqtt_username="u", mqtt_password="p"
    )
    note = broker_note(urls, settings)
    assert says in note
    assert (note == "") == (says == "")
