"""MqttLink: one small interface over paho-mqtt for the agent and the fleet service.

Habits from Home Assistant's and Frigate's MQTT clients: the Last Will is set before
connecting, ``online`` is published (retained) only after the broker accepted us, every
subscription is renewed on every connect, the reconnect loop is ours (exponential backoff
with full jitter, so a fleet coming back after an outage does not stampede the broker),
and a handler that raises is logged and never kills the network loop.

Only the network thread writes to the socket: paho's manual ``loop()`` would otherwise write
from whichever thread publishes or acknowledges, and two threads interleaving a partly sent
chunk corrupt the stream. A receiver that stores what it gets (the fleet service) opts into
a persistent session and manual acknowledgements: it acks a message once it is safe, and
whatever it had not acked when it went away is delivered again when it returns.

A sender that must not outrun the broker (the chunk carousel) reads :attr:`MqttLink.in_flight`,
the QoS 1 messages the broker has not acknowledged yet, and is told of each acknowledgement
through ``on_published``: paho's own queue then never grows beyond what the sender allows.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from shared.mqtt_inbound import Acker, Handler, Inbound, InboundHandler, ack_all, topic_matches
from shared.mqtt_outbound import Unacknowledged
from shared.mqtt_tls import MqttTls, parse_mqtt_url, tls_context
from shared.retry import Backoff

__all__ = [
    "Acker",
    "Handler",
    "Inbound",
    "InboundHandler",
    "LinkStats",
    "MqttLink",
    "ack_all",
    "topic_matches",
]

_LOGGER = logging.getLogger(__name__)

_PUBACK = struct.Struct("!BBH")  # fixed header (PUBACK, remaining length 2), packet id


@dataclass
class LinkStats:
    connects: int = 0
    refused: int = 0
    disconnects: int = 0
    handler_errors: int = 0
    acks: int = 0
    # Acks for a message received on an earlier connection are not sent: the broker
    # delivers the message again on the new one, and that copy is acked instead.
    stale_acks: int = 0
    # TLS connections that failed: an untrusted broker, or ours refused (closed unanswered).
    tls_failures: int = 0
    session_present: bool = False
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
        clean_session: bool = True,
        manual_ack: bool = False,
        tls: MqttTls | None = None,
        on_published: Callable[[], None] | None = None,
    ) -> None:
        """``clean_session=False`` with a stable ``client_id`` keeps the session (subscriptions
        and unacknowledged QoS 1 messages) on the broker while we are away; ``manual_ack``
        lets :meth:`subscribe_inbound` handlers ack once they have stored a message;
        ``on_published`` is called (on the network thread) whenever paho is done with one of
        our messages — a QoS 1 one acknowledged by the broker, a QoS 0 one written — so
        :attr:`in_flight` may have gone down.

        An ``mqtts://`` URL connects over TLS with ``tls`` (None: the system's trust store);
        its files are read here, so a bad one is a ValueError now, not in the network thread.
        """
        endpoint = parse_mqtt_url(url)
        self.host, self.port = endpoint.host, endpoint.port
        self.tls = tls
        self._ssl_context = tls_context(endpoint, tls)
        self.client_id = client_id
        self.will = will
        self.backoff = backoff or Backoff(base=0.5, cap=30.0)
        self.keepalive = keepalive
        self.on_connected = on_connected
        self.on_published = on_published
        self.stats = LinkStats()
        self.manual_ack = manual_ack
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._inbound: dict[str, tuple[InboundHandler, int]] = {}
        self._lock = threading.RLock()
        # topic -> its handlers, filled on first sight (the network thread, under _lock) and
        # emptied on every subscription change: no filter is matched twice for one topic.
        self._routes: dict[str, tuple[list[Handler], list[InboundHandler]]] = {}
        # Bumped whenever a connection ends or begins (under _ack_lock): which acks are stale.
        self._generation = 0
        # QoS 1 messages of this connection not acked yet, in arrival order (mid -> ack asked).
        self._unacked: dict[int, bool] = {}
        self._ack_lock = threading.Lock()
        self._unacknowledged = Unacknowledged()
        self._connected = threading.Event()
        # SUBACKs still awaited for the subscriptions renewed at the last connect.
        self._pending_subacks: set[int] = set()
        self._subscribed = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._username, self._password = username, password
        self._client = self._new_client(
            clean_session=clean_session, reconnect_on_failure=False, manual_ack=manual_ack
        )
        # With a write hook registered, paho queues what other threads send and wakes our
        # loop (its socket pair) instead of writing from their thread.
        self._client.on_socket_register_write = _writes_stay_on_the_network_thread
        self._client.max_queued_messages_set(10_000)
        self._client.max_inflight_messages_set(100)
        if will is not None:
            # Set before connecting: if we vanish, the broker says so for us.
            self._client.will_set(will.topic, will.offline, qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    def _new_client(self, **options: Any) -> mqtt.Client:
        """A paho client with our id, login and TLS: the link's, and forget_session's."""
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, **options)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
        if self._username is not None:
            client.username_pw_set(self._username, self._password)
        return client

    # -- the interface -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    @property
    def in_flight(self) -> int:
        """Our QoS >= 1 messages the broker has not acknowledged yet: sent and waiting for
        their PUBACK, or kept by paho to be sent (while disconnected, or beyond its window)."""
        return self._unacknowledged.count

    def wait_subscribed(self, timeout: float) -> bool:
        """Connected, and the broker acknowledged every subscription: from now on it routes
        what is published to us (or, in a kept session, holds it for us)."""
        return self._connected.wait(timeout) and self._subscribed.wait(timeout)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt-{self.client_id}", daemon=True
        )
        self._thread.start()

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._handlers[topic_filter] = (handler, qos)
            self._routes = {}
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def subscribe_inbound(self, topic_filter: str, handler: InboundHandler, qos: int = 1) -> None:
        """Like :meth:`subscribe`, but the handler gets an :class:`Inbound` and acks it itself
        (needs ``manual_ack=True``); until it does, the broker keeps the message for us."""
        if not self.manual_ack:
            raise ValueError("subscribe_inbound needs an MqttLink made with manual_ack=True")
        with self._lock:
            self._inbound[topic_filter] = (handler, qos)
            self._routes = {}
        if self.connected:
            self._client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        with self._lock:
            self._handlers.pop(topic_filter, None)
            self._inbound.pop(topic_filter, None)
            self._routes = {}
        if self.connected:
            self._client.unsubscribe(topic_filter)

    def publish(
        self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """True if the message is on its way: sent, or (QoS >= 1 while disconnected) kept by
        paho, which sends it again after the next CONNACK. False if it was dropped: QoS 0
        while disconnected, or paho's queue is full. The caller decides what False means."""
        info = self._send(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_SUCCESS:
            return True
        # paho 2.2 keeps a QoS >= 1 message it could not send in its outgoing store and
        # resends it on reconnect (Client._messages_reconnect_reset_out); QoS 0 is gone.
        return info.rc == mqtt.MQTT_ERR_NO_CONN and qos > 0

    def _send(
        self, topic: str, payload: bytes | str, *, qos: int, retain: bool
    ) -> mqtt.MQTTMessageInfo:
        """Every publish of ours goes through here, so :attr:`in_flight` counts them all."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos > 0 and info.rc in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._unacknowledged.sent(info.mid)
        return info

    def stop(self, timeout: float = 5.0) -> None:
        """Say ``stopped`` (retained) and leave cleanly; the Last Will then does not fire."""
        if self.will is not None and self.connected:
            info = self._send(self.will.topic, self.will.stopped, qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout=min(timeout, 2.0))
        self._stopping.set()
        if self.connected:
            self._client.disconnect()
        if self._thread is not None:
            self._thread.join(timeout)

    def forget_session(self, timeout: float = 5.0) -> bool:
        """After :meth:`stop`: connect once with a clean session, so the broker drops ours
        (its subscriptions and what it queued for us). For a client id that will not return."""
        client = self._new_client(clean_session=True)
        accepted = threading.Event()

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if not reason.is_failure:
                accepted.set()

        client.on_connect = on_connect
        try:
            client.connect(self.host, self.port, keepalive=self.keepalive)
        except (OSError, ValueError):
            return False
        deadline = time.monotonic() + timeout
        while not accepted.is_set() and time.monotonic() < deadline:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
        client.disconnect()
        client.loop(timeout=0.1)
        return accepted.is_set()

    # -- the loop ----------------------------------------------------------------------

    def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            self._next_generation()
            try:
                self._client.connect(self.host, self.port, keepalive=self.keepalive)
            except (OSError, ValueError) as exc:
                self._connect_failed(exc)
            else:
                answers = self.stats.connects + self.stats.refused
                if self._loop_until_disconnected():
                    attempt = 0
                elif answers == self.stats.connects + self.stats.refused:
                    self._closed_before_connack()
            if self._stopping.is_set():
                break
            delay = self.backoff.delay(attempt)
            self.stats.reconnect_delays.append(delay)
            attempt += 1
            self._stopping.wait(delay)

    def _connect_failed(self, exc: Exception) -> None:
        if not isinstance(exc, ssl.SSLError | ssl.CertificateError):
            _LOGGER.debug(
                "%s: connect to %s:%s failed: %s", self.client_id, self.host, self.port, exc
            )
            return
        # A broker we do not trust (or that does not trust us) will not fix itself: say so.
        self.stats.tls_failures += 1
        _LOGGER.warning("%s: TLS with %s:%s failed: %s", self.client_id, self.host, self.port, exc)

    def _closed_before_connack(self) -> None:
        if self._ssl_context is None or self._stopping.is_set():
            return
        # Under TLS 1.3 a broker refuses our certificate (or its absence) only once our side
        # of the handshake is done: the connection then closes without a CONNACK.
        self.stats.tls_failures += 1
        _LOGGER.warning(
            "%s: %s:%s closed the TLS connection without answering (does it require a client "
            "certificate?)", self.client_id, self.host, self.port,
        )  # fmt: skip

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

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            # Never mark a refused connection as up (a Frigate bug worth not copying).
            self.stats.refused += 1
            _LOGGER.warning("%s: broker refused the connection: %s", self.client_id, reason)
            client.disconnect()
            return
        self.stats.connects += 1
        self.stats.session_present = bool(flags.session_present)
        with self._lock:
            subscriptions = [(f, qos) for f, (_h, qos) in self._handlers.items()]
            subscriptions += [(f, qos) for f, (_h, qos) in self._inbound.items()]
        with self._lock:
            self._subscribed.clear()
            mids = (client.subscribe(f, qos)[1] for f, qos in subscriptions)
            self._pending_subacks = {mid for mid in mids if mid is not None}
            if not self._pending_subacks:
                self._subscribed.set()
        if self.will is not None:
            self._send(self.will.topic, self.will.online, qos=1, retain=True)
        self._connected.set()
        if self.on_connected is not None:
            self._safely(self.on_connected)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if self._connected.is_set():
            self.stats.disconnects += 1
            _LOGGER.info("%s: disconnected (%s)", self.client_id, reason)
        self._connected.clear()
        self._next_generation()

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        """The broker acknowledged ``mid`` (or paho wrote a QoS 0 message)."""
        self._unacknowledged.acked(mid)
        if self.on_published is not None:
            self._safely(self.on_published)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, mid: int, _codes: Any, _p: Any) -> None:
        with self._lock:
            self._pending_subacks.discard(mid)
            if not self._pending_subacks:
                self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            topic = ""  # matches no filter: logged below, and acked in manual mode
        # Only this thread changes the generation: read without a lock, it is exact.
        generation = self._generation
        route = self._routes.get(topic)
        if route is None:
            route = self._route(topic)
        handlers, inbound = route
        for handler in handlers:
            self._safely(handler, topic, message.payload)
        if not self.manual_ack:
            return  # paho acked it
        payload = message.payload
        item = Inbound(
            topic, bytes(payload), message.qos, time.monotonic(), self, message.mid, generation
        )
        if message.qos == 1:
            self._received(message.mid)
        if not inbound:
            # Nobody stores it (a plain handler, or a subscription left in our persistent
            # session by an older version): ack now, or it would hold an inflight slot.
            if not handlers:
                _LOGGER.debug("%s: no handler for %r; acked", self.client_id, topic)
            self.ack_many((item,))
            return
        for receiver in inbound:
            if not self._safely(receiver, item):
                # A handler that raised will not ack it; a slot held forever would stall us.
                self.ack_many((item,))

    def _route(self, topic: str) -> tuple[list[Handler], list[InboundHandler]]:
        with self._lock:
            route = (
                [h for f, (h, _q) in self._handlers.items() if topic_matches(f, topic)],
                [h for f, (h, _q) in self._inbound.items() if topic_matches(f, topic)],
            )
            if len(self._routes) >= 50_000:
                self._routes = {}
            self._routes[topic] = route
        return route

    def ack_many(self, items: Sequence[Inbound]) -> None:
        """Acknowledge received messages (manual-ack mode), in the order they arrived: an
        ack is held until every QoS 1 message received before it is acked too, as MQTT asks
        [MQTT-4.6.0-2] (rumqttd drops a client whose acks come out of order). Those from an
        earlier connection are not sent: the broker delivers them again on this one."""
        if not self.manual_ack:
            return
        with self._ack_lock:
            current = self._generation
            for item in items:
                if item.qos == 0:
                    continue
                if item.generation != current:
                    self.stats.stale_acks += 1
                elif item.qos == 1:
                    if item.mid in self._unacked:
                        self._unacked[item.mid] = True
                else:
                    self._client.ack(item.mid, item.qos)
            mids = []
            while self._unacked:
                head = next(iter(self._unacked))
                if not self._unacked[head]:
                    break
                del self._unacked[head]
                mids.append(head)
            self.stats.acks += len(mids)
            queue = getattr(self._client, "_packet_queue", None)
            if queue is None or len(mids) < 2:
                for mid in mids:
                    self._client.ack(mid, 1)
            elif mids:
                # One write (and one wake of the loop) for the lot: paho would send each
                # 4-byte PUBACK alone, a system call per message at thousands a second.
                queue(mqtt.PUBACK, b"".join(_PUBACK.pack(0x40, 2, m) for m in mids), 0, 1)

    def _received(self, mid: int) -> None:
        """A QoS 1 message arrived (network thread): its ack takes its place in line."""
        with self._ack_lock:
            self._unacked[mid] = False

    def _next_generation(self) -> None:
        with self._ack_lock:
            self._generation += 1
            self._unacked.clear()

    def _safely(self, fn: Callable[..., None], *args: Any) -> bool:
        try:
            fn(*args)
        except Exception:
            self.stats.handler_errors += 1
            _LOGGER.exception("%s: handler failed; the loop goes on", self.client_id)
            return False
        return True


def _writes_stay_on_the_network_thread(_client: mqtt.Client, _userdata: Any, _sock: Any) -> None:
    """paho's write hook: nothing to do, our loop's select() wakes on paho's socket pair."""
