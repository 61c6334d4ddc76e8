"""The shipped Mosquitto config and ACL, on a real mosquitto: a device keeps to its scope."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.embedded.processes import free_port, wait_for_port
from shared import topics

ROOT = Path(__file__).resolve().parents[2]
USERS = {
    "edgefleet-cloud": "cloud-secret-123",
    "cam-a": "token-a-123456",
    "cam-b": "token-b-123456",
}


@pytest.fixture
def secured_broker(tmp_path: Path) -> Iterator[int]:
    binary, passwd = (
        shutil.which("mosquitto") or "/usr/sbin/mosquitto",
        shutil.which("mosquitto_passwd"),
    )
    if not Path(binary).exists() or passwd is None:
        if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
            pytest.fail("mosquitto is not installed, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
        pytest.skip("mosquitto is not installed")
    port = free_port()
    pw = tmp_path / "passwd"
    for user, password in USERS.items():
        flags = ["-b"] if pw.exists() else ["-c", "-b"]
        subprocess.run([passwd, *flags, str(pw), user, password], check=True)
    pw.chmod(0o600)
    conf = (ROOT / "deploy/mosquitto/edgefleet.conf").read_text()
    conf = conf.replace("listener 8883", f"listener {port} 127.0.0.1")
    conf = conf.replace("/etc/mosquitto/edgefleet.passwd", str(pw))
    conf = conf.replace(
        "/etc/mosquitto/edgefleet.acl", str(ROOT / "deploy/mosquitto/edgefleet.acl")
    )
    if os.geteuid() == 0:
        # Mosquitto started as root drops to user "mosquitto", which cannot enter pytest's
        # private tmp dirs; in the test it keeps our user instead.
        conf += "\nuser root\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen(
        [binary, "-c", str(tmp_path / "mosquitto.conf")], stderr=subprocess.DEVNULL
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=10, process=proc)  # type: ignore[arg-type]
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


def _client(
    port: int, user: str, password: str | None = None
) -> tuple[mqtt.Client, list[tuple[str, bytes]], list[int]]:
    got: list[tuple[str, bytes]] = []
    connack: list[int] = []
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:4]}"
    )
    client.username_pw_set(user, password if password is not None else USERS.get(user, "x"))
    client.on_message = lambda _c, _u, m: got.append((m.topic, m.payload))
    client.on_connect = lambda _c, _u, _f, rc, _p: connack.append(rc.value)
    client.connect("127.0.0.1", port)
    client.loop_start()
    deadline = time.monotonic() + 5
    while not connack and time.monotonic() < deadline:
        time.sleep(0.02)
    return client, got, connack


def test_devices_keep_to_their_own_scope(secured_broker: int) -> None:
    port = secured_broker
    cloud, cloud_got, _ = _client(port, "edgefleet-cloud")
    cloud.subscribe("edgefleet/v1/dev/+/status", 1)
    a, a_got, a_ack = _client(port, "cam-a")
    assert a_ack == [0]
    a.subscribe("edgefleet/v1/dev/cam-b/desired", 1)  # someone else's
    a.subscribe("edgefleet/v1/dev/cam-a/desired", 1)  # its own
    a.subscribe("edgefleet/v1/artifacts/#", 1)
    time.sleep(0.3)
    cloud.publish("edgefleet/v1/dev/cam-b/desired", b"for b", qos=1, retain=False).wait_for_publish(
        5
    )
    cloud.publish("edgefleet/v1/dev/cam-a/desired", b"for a", qos=1).wait_for_publish(5)
    cloud.publish("edgefleet/v1/artifacts/" + "a" * 64 + "/0", b"chunk", qos=1).wait_for_publish(5)
    a.publish("edgefleet/v1/dev/cam-b/status", b"forged", qos=1).wait_for_publish(5)
    a.publish("edgefleet/v1/dev/cam-a/status", b"mine", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    assert sorted(p for _t, p in a_got) == [b"chunk", b"for a"]
    assert [p for _t, p in cloud_got] == [b"mine"]
    for client in (cloud, a):
        client.loop_stop()
        client.disconnect()


def test_a_wrong_token_is_refused(secured_broker: int) -> None:
    client, _, ack = _client(secured_broker, "cam-a", "not-the-token")
    assert ack
    assert ack[0] != 0
    client.loop_stop()


def test_every_device_reads_the_cloud_budget_and_none_may_write_it(secured_broker: int) -> None:
    """DESIGN §3: a device reads ``cloud/budget`` (retained); only the cloud writes it. The
    shipped ACL once gave devices no read on it: the agents never heard a budget."""
    port = secured_broker
    cloud, _, _ = _client(port, "edgefleet-cloud")
    cloud.publish(topics.CLOUD_BUDGET, b"from the cloud", qos=1, retain=True).wait_for_publish(5)
    a, a_got, a_ack = _client(port, "cam-a")
    assert a_ack == [0]
    a.subscribe(topics.CLOUD_BUDGET, 1)
    time.sleep(0.3)
    a.publish(topics.CLOUD_BUDGET, b"forged", qos=1, retain=True).wait_for_publish(5)
    time.sleep(0.3)
    b, b_got, _ = _client(port, "cam-b")
    b.subscribe(topics.CLOUD_BUDGET, 1)
    time.sleep(0.5)
    assert [p for _t, p in a_got] == [b"from the cloud"]
    assert [p for _t, p in b_got] == [b"from the cloud"]
    cloud.publish(topics.CLOUD_BUDGET, b"", qos=1, retain=True).wait_for_publish(5)
    for client in (cloud, a, b):
        client.loop_stop()
        client.disconnect()
