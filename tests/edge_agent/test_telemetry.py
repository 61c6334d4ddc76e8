"""Telemetry: windowed counters and latency, and no window lost while offline — kept in a
bounded outbox (oldest dropped first, the drops counted in the next window and in /metrics)
and sent in order once the broker takes the agent again."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud.embedded.processes import free_port, wait_for_port
from edge_agent.agent import Agent
from edge_agent.telemetry import LATENCY_BOUNDS_MS, Meter, Outbox
from shared import topics
from shared.messages import Telemetry, decode
from shared.retry import Backoff
from shared.topics import DeviceTopic
from tests.edge_agent.support import DEVICE, agent_settings, wait_for

# -- the meter -------------------------------------------------------------------------


def test_a_snapshot_holds_its_window_and_starts_the_next() -> None:
    meter = Meter()
    meter.count("answers_edge", 2)
    meter.observe_ms(0.2)
    meter.observe_ms(7.0)
    meter.observe_ms(10_000)
    first = meter.snapshot({"m": 3})
    assert first.counts == {"answers_edge": 2}
    assert first.active == {"m": 3}
    assert first.latency_ms is not None
    assert first.latency_ms.bounds == LATENCY_BOUNDS_MS
    assert first.latency_ms.counts[0] == 1  # <= 0.5 ms
    assert first.latency_ms.counts[LATENCY_BOUNDS_MS.index(10)] == 1  # (5, 10] ms
    assert first.latency_ms.counts[-1] == 1  # beyond the last bound
    assert first.window_s > 0
    second = meter.snapshot({})
    assert second.counts == {}
    assert sum(second.latency_ms.counts) == 0  # type: ignore[union-attr]
    assert meter.totals["answers_edge"] == 2  # lifetime totals stay for /metrics
    assert sum(meter.total_buckets) == 3


# -- the outbox ------------------------------------------------------------------------


class Link:
    """What the outbox sends through: up or down, recording what it took."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> bool:
        if self.up:
            self.sent.append(payload)
        return self.up


def test_windows_wait_while_offline_and_go_out_in_order() -> None:
    outbox, link = Outbox(10), Link()
    for n in range(3):
        outbox.put(b"w%d" % n)
        assert outbox.flush(link.send) == 0
    assert len(outbox) == 3
    link.up = True
    assert outbox.flush(link.send) == 3
    assert link.sent == [b"w0", b"w1", b"w2"]
    assert len(outbox) == 0


def test_a_full_outbox_drops_the_oldest_and_counts_them() -> None:
    drops: list[int] = []
    outbox, link = Outbox(3, on_drop=drops.append), Link()
    for n in range(7):
        outbox.put(b"w%d" % n)
    assert len(outbox) == 3
    assert outbox.dropped == 4
    assert drops == [1, 1, 1, 1]
    link.up = True
    outbox.flush(link.send)
    assert link.sent == [b"w4", b"w5", b"w6"]


def test_a_refused_publish_keeps_that_window_and_those_after_it() -> None:
    """The link goes down after the first window: nothing after it is lost or reordered."""
    outbox = Outbox(10)
    for n in range(4):
        outbox.put(b"w%d" % n)
    sent: list[bytes] = []

    def once(payload: bytes) -> bool:
        if sent:
            return False
        sent.append(payload)
        return True

    assert outbox.flush(once) == 1
    link = Link()
    link.up = True
    assert outbox.flush(link.send) == 3
    assert sent + link.sent == [b"w0", b"w1", b"w2", b"w3"]


def test_an_outbox_holds_at_least_one_window() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Outbox(0)


# -- an agent whose broker refuses it, then takes it -----------------------------------


class Broker:
    """A private Mosquitto with a password file: the agent is refused until it is added."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.passwd = shutil.which("mosquitto_passwd")
        if not Path(binary).exists() or self.passwd is None:
            if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
                pytest.fail("mosquitto is not installed, and EDGEFLEET_REQUIRE_SERVICES=1 needs it")
            pytest.skip("mosquitto is not installed")
        self.port = free_port()
        self.users = folder / "passwd"
        self.add("watcher", "watcher-secret")
        conf = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous false",
            f"password_file {self.users}",
            "persistence false",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to "mosquitto", locked out of tmp_path
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port("127.0.0.1", self.port, timeout=10, process=self.process)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def add(self, user: str, password: str) -> None:
        assert self.passwd is not None
        flags = ["-b"] if self.users.exists() else ["-c", "-b"]
        subprocess.run([self.passwd, *flags, str(self.users), user, password], check=True)
        self.users.chmod(0o600)

    def reload(self) -> None:
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(5)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    running = Broker(tmp_path)
    yield running
    running.stop()


class Watcher:
    """Subscribed to the agent's telemetry; keeps what arrives, in arrival order."""

    def __init__(self, broker: Broker) -> None:
        self.windows: list[Telemetry] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"watcher-{uuid.uuid4().hex[:6]}"
        )
        self.client.username_pw_set("watcher", "watcher-secret")
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.subscribe(topics.device_topic(DEVICE, DeviceTopic.TELEMETRY), 1)
        self.client.loop_start()
        assert self._subscribed.wait(5)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.windows.append(decode(Telemetry, message.payload))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_windows_taken_offline_arrive_in_order_after_reconnect_with_the_drops_counted(
    tmp_path: Path, broker: Broker
) -> None:
    """Five windows while the broker refuses the agent, room for three: windows 3, 4 and 5
    arrive first and in order once it is let in, and the two dropped ones are counted in the
    telemetry itself and in /metrics. Before, every window taken offline was lost."""
    watcher = Watcher(broker)
    settings = agent_settings(
        tmp_path / "agent",
        mqtt_url=broker.url,
        telemetry_interval_s=3600,  # the test closes the windows itself
        telemetry_buffer=3,
    )
    agent = Agent(settings)
    agent.link.backoff = Backoff(base=0.05, cap=0.2)
    agent.start(serve_api=False)
    try:
        for window in range(1, 6):
            agent.meter.count("window", window)
            agent.close_telemetry_window()
            assert agent.send_telemetry() == 0
        assert not agent.link.connected
        assert (len(agent.outbox), agent.outbox.dropped) == (3, 2)
        assert 'edgefleet_agent_events_total{kind="telemetry_dropped"} 2' in agent.prometheus()

        broker.add(DEVICE, settings.token)
        broker.reload()
        wait_for(lambda: len(watcher.windows) == 3, 15, "the kept windows")
        assert [w.counts["window"] for w in watcher.windows] == [3, 4, 5]
        assert [w.at for w in watcher.windows] == sorted(w.at for w in watcher.windows)
        # The drop made room for window 4 is reported by window 5, the next by window 6.
        assert watcher.windows[2].counts.get("telemetry_dropped") == 1
        agent.close_telemetry_window()
        assert agent.send_telemetry() == 1
        wait_for(lambda: len(watcher.windows) == 4, 10, "the window after reconnect")
        assert watcher.windows[3].counts == {"telemetry_dropped": 1}
        assert len(agent.outbox) == 0
        assert "edgefleet_agent_telemetry_buffered 0" in agent.prometheus()
    finally:
        agent.stop()
        watcher.stop()
