"""MqttLink: one small interface over paho-mqtt for the agent and the fleet service.

Habits from Home Assistant's and Frigate's MQTT clients: the Last Will is set before
connecting, ``online`` is published (retained) only after the broker accepted us, every
subscription is renewed on every connect, the reconnect loop is ours (exponential backoff
with full jitter, so a fleet coming back after an outage does not stampede the broker),
and a handler that raises is logged and never kills the network loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.retry import Backoff

__all__ = ["Handler", "LinkStats", "MqttLink", "topic_matches"]

_LOGGER = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]


def topic_matches(pattern: str, topic: str) -> bool:
    if pattern.startswith("$share/"):
        pattern = pattern.split("/", 2)[2]
    return bool(mqtt.topic_matches_sub(pattern, topic))


@dataclass
class LinkStats:
    connects: int = 0
    refused: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    reconnect_delays: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    offline: bytes
    online: bytes
    stopped: bytes


class MqttLink:
    """Connects, keeps connected, routes messages to handlers by topic filter."""

    def __init__(
        self,
        url: str,
        *,
        client_id: str,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        backoff: Backoff | None = None,
        keepalive: int = 30,
        on_connected: Callable[[], None] | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "tcp"):
            raise ValueError(f"unsupported MQTT URL {url!r}: use mqtt://host:port")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 1883
        self.client_id = client_id
        self.will = will
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.keepalive = keepalive
        self.on_connected = on_connected
        self.stats = LinkStats()
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._lock = threading.RLock()
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            reconnect_on_failure=False,
        )
        self._client.max_queued_messages_set(10_000)
        self._client.max_inflight_messages_set(100)
        if username is not None:
            self._client.username_pw_set(username, password)
        if will is not None:
            # Set before connecting: if we vanish, the broker says so for us.
            self._client.will_set(will.topic, will.offline, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- the interface -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """Queue a message; False if it could not even be queued (then the caller decides)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN)

    def stop(self, timeout: float = 5.0) -> None:
        """Say ``stopped`` (retained) and leave cleanly; the Last Will then does not fire."""
        if self.will is not None and self.connected:
            info = self._client.publish(self.will.topic, self.will.stopped, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=min(timeout, 2.0))
        self._stopping.set()
        if self.connected:
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                self._client.connect(self.host, self.port, keepalive=self.keepalive)
            except (OSError, ValueError) as exc:
                _LOGGER.debug(
                    "%s: connect to %s:%s failed: %s", self.client_id, self.host, self.port, exc
                )
            else:
                had_session = self._loop_until_disconnected()
                if had_session:
                    attempt = 0
            if self._stopping.is_set():
                break
            delay = self.backoff.delay(attempt)
            self.stats.reconnect_delays.append(delay)
            attempt += 1
            self._stopping.wait(delay)

    def _loop_until_disconnected(self) -> bool:
        had_session = False
        while not self._stopping.is_set():
            rc = self._client.loop(timeout=0.2)
            had_session = had_session or self.connected
            if rc != mqtt.MQTT_ERR_SUCCESS:
                break
        if self._stopping.is_set():
            # Drain the DISCONNECT we sent.
            for _ in range(5):
                if self._client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                    break
        self._connected.clear()
        return had_session

    # -- paho callbacks (network thread) -------------------------------------------------

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            # Never mark a refused connection as up (a Frigate bug worth not copying).
            self.stats.refused += 1
            _LOGGER.warning("%s: broker refused the connection: %s", self.client_id, reason)
            client.disconnect()
            return
        self.stats.connects += 1
        with self._lock:
            subscriptions = [(f, qos) for f, (_h, qos) in self._handlers.items()]
        for topic_filter, qos in subscriptions:
            client.subscribe(topic_filter, qos)
        if self.will is not None:
            client.publish(self.will.topic, self.will.online, qos=1, retain=True)
        self._connected.set()
        if self.on_connected is not None:
            self._safely(self.on_connected)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            _LOGGER.info("%s: disconnected (%s)", self.client_id, reason)
        self._connected.clear()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            handlers = [
                h for f, (h, _q) in self._handlers.items() if topic_matches(f, message.topic)
            ]
        for handler in handlers:
            self._safely(handler, message.topic, message.payload)

    def _safely(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.handler_errors += 1
            _LOGGER.exception("%s: handler failed; the loop goes on", self.client_id)
