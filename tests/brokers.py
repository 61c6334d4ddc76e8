"""Test brokers: a real Mosquitto with the dynamic-security plugin on a free port, and a probe
client that records what the broker let it do."""

from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud.api.app import create_app
from cloud.broker.setup import find_plugin, write_dynsec_config
from cloud.context import CloudContext
from cloud.embedded.processes import ChildProcess, free_port
from cloud.embedded.services import ServiceUrls
from cloud.settings import CloudSettings
from tests.conftest import ADMIN_TOKEN, RunningApi, serve_in_thread
from tests.pki import Pki

__all__ = [
    "DynsecBroker",
    "MqttProbe",
    "dynsec_cloud_api",
    "dynsec_cloud_context",
    "dynsec_mosquitto",
    "mosquitto_with_plugin",
    "settle",
]

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "dynsec.conf"
CLOUD_USERNAME = "edgefleet-cloud"
CLOUD_PASSWORD = "cloud-secret-" + "0123456789"


def _missing(reason: str) -> None:
    if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)


@dataclass
class DynsecBroker:
    """A Mosquitto child process running the shipped dynsec.conf on 127.0.0.1:``port``."""

    port: int
    dynsec_file: Path
    conf_file: Path
    log_file: Path
    cloud_username: str = CLOUD_USERNAME
    cloud_password: str = CLOUD_PASSWORD
    # Its listener's TLS certificates (the shipped config's TLS lines, uncommented).
    tls: Pki | None = None
    process: ChildProcess | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary, _plugin = mosquitto_with_plugin()
        self.process = ChildProcess([binary, "-c", str(self.conf_file)], log_path=self.log_file)
        self.process.start(host="127.0.0.1", port=self.port, timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""


def _conf(
    shipped: str, *, port: int, dynsec_file: Path, plugin: Path, tls: Pki | None = None
) -> str:
    """The shipped config with this test's listener, plugin and file (nothing else changed);
    with ``tls``, its commented TLS lines in use with these certificates."""
    lines = []
    for line in shipped.splitlines():
        key = line.split(" ", 1)[0]
        tls_line = re.fullmatch(r"# (cafile|certfile|keyfile) \S+", line)
        if tls is not None and tls_line:
            option = tls_line.group(1)
            files = {"cafile": tls.ca_file, "certfile": tls.server_cert, "keyfile": tls.server_key}
            line = f"{option} {files[option]}"
        elif key == "listener":
            line = f"listener {port} 127.0.0.1"
        elif key == "plugin":
            line = f"plugin {plugin}"
        elif key == "plugin_opt_config_file":
            line = f"plugin_opt_config_file {dynsec_file}"
        elif key == "persistence_location":
            line = f"persistence_location {dynsec_file.parent}/"
        lines.append(line)
    if os.geteuid() == 0:
        # Started as root, Mosquitto drops to user "mosquitto", which cannot write pytest's
        # private tmp dirs (the plugin rewrites its file there); in tests it keeps our user.
        lines.append("user root")
    return "\n".join(lines) + "\n"


def mosquitto_with_plugin() -> tuple[str, Path]:
    """The mosquitto binary and its dynamic-security plugin; skip (or fail under CI) without."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    plugin = find_plugin()
    if not Path(binary).exists() or plugin is None:
        _missing("mosquitto with its dynamic-security plugin is not installed")
    assert plugin is not None
    return binary, plugin


@contextmanager
def dynsec_mosquitto(
    folder: Path,
    *,
    cloud_password: str = CLOUD_PASSWORD,
    initialised: bool = False,
    tls: Pki | None = None,
) -> Iterator[DynsecBroker]:
    """A fresh Mosquitto with the dynamic-security plugin, set up as `edgefleet broker init`
    does (or, with ``initialised``, on the ``folder/dynsec.json`` already there), on a free
    port, TLS only with ``tls``; skipped (failed under CI) where Mosquitto or the plugin is
    absent."""
    _binary, plugin = mosquitto_with_plugin()
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    broker = DynsecBroker(
        port=port,
        dynsec_file=folder / "dynsec.json",
        conf_file=folder / "mosquitto.conf",
        log_file=folder / "mosquitto.log",
        cloud_password=cloud_password,
        tls=tls,
    )
    if not initialised:
        write_dynsec_config(
            broker.dynsec_file,
            cloud_username=broker.cloud_username,
            cloud_password=broker.cloud_password,
        )
    broker.conf_file.write_text(
        _conf(
            SHIPPED_CONF.read_text(),
            port=port,
            dynsec_file=broker.dynsec_file,
            plugin=plugin,
            tls=tls,
        )
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@dataclass
class MqttProbe:
    """One MQTT client that records its CONNACK, SUBACKs, messages and disconnects."""

    port: int
    username: str | None
    password: str | None
    client_id: str = field(default_factory=lambda: f"probe-{uuid.uuid4().hex[:8]}")
    connack: list[str] = field(default_factory=list)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    disconnects: list[str] = field(default_factory=list)
    _subacks: dict[int, list[Any]] = field(default_factory=dict)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, reconnect_on_failure=False
        )
        if self.username is not None:
            self.client.username_pw_set(self.username, self.password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def _note(self, change: Any) -> None:
        with self._changed:
            change()
            self._changed.notify_all()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._note(lambda: self.connack.append(str(reason)))

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reasons: Any, _p: Any) -> None:
        self._note(lambda: self._subacks.__setitem__(mid, list(reasons)))

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        self._note(lambda: self.messages.append((message.topic, bytes(message.payload))))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._note(lambda: self.disconnects.append(str(reason)))

    def wait(self, condition: Any, timeout: float = 5.0) -> bool:
        with self._changed:
            return bool(self._changed.wait_for(condition, timeout))

    def connect(self) -> bool:
        """Connect; True when the broker accepted the login."""
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self.wait(lambda: self.connack), "no CONNACK"
        return self.connack[-1] == "Success"

    def subscribe(self, topic: str) -> bool:
        """Subscribe at QoS 1; True when the broker granted it."""
        mid = self.client.subscribe(topic, qos=1)[1]
        assert mid is not None, f"could not send SUBSCRIBE for {topic}"
        assert self.wait(lambda: mid in self._subacks), f"no SUBACK for {topic}"
        return not self._subacks[mid][0].is_failure

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the PUBACK (MQTT 3.1.1 acks refused ones too)."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def received(self, payload: bytes, timeout: float = 5.0) -> bool:
        return self.wait(lambda: any(p == payload for _t, p in self.messages), timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def settle(probes: list[MqttProbe], marker_topic: str, publisher: MqttProbe) -> None:
    """Wait until a marker published after everything else reached every probe.

    Mosquitto routes a QoS 1 message before it acks it, on one thread, so anything acked
    before the marker was sent is queued ahead of it: what a probe lacks once it has the
    marker, the broker did not deliver.
    """
    marker = f"marker-{uuid.uuid4().hex}".encode()
    publisher.publish(marker_topic, marker)
    for probe in probes:
        assert probe.received(marker), f"{probe.client_id} never got the marker"


@contextmanager
def dynsec_cloud_context(
    data_dir: Path, broker: DynsecBroker, redis_url: str
) -> Iterator[CloudContext]:
    """A cloud context with EDGEFLEET_BROKER_ACCOUNTS=dynsec, logged in to ``broker``."""
    settings = CloudSettings(
        data_dir=data_dir,
        admin_token=ADMIN_TOKEN,
        mqtt_url=broker.url,
        mqtt_username=broker.cloud_username,
        mqtt_password=broker.cloud_password,
        broker_accounts="dynsec",
        broker_timeout_s=2.0,
        mqtt_ca_file=None if broker.tls is None else broker.tls.ca_file,
    )
    urls = ServiceUrls(settings.resolved_database_url, broker.url, redis_url)
    context = CloudContext.open(settings, urls)
    try:
        yield context
    finally:
        context.close()


@contextmanager
def dynsec_cloud_api(data_dir: Path, broker: DynsecBroker, redis_url: str) -> Iterator[RunningApi]:
    """The cloud API (real uvicorn) with EDGEFLEET_BROKER_ACCOUNTS=dynsec on ``broker``."""
    with (
        dynsec_cloud_context(data_dir, broker, redis_url) as context,
        serve_in_thread(create_app(context)) as url,
    ):
        yield RunningApi(url, context)
