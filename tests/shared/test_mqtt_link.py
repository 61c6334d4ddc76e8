"""MqttLink on a real Mosquitto: what publish reports, and manual acks on a kept session."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from cloud.embedded.processes import free_port
from cloud.embedded.services import ServiceUrls
from shared.mqtt_link import Inbound, MqttLink, ack_all, topic_matches
from shared.retry import Backoff
from tests.fleet_harness import wait_for
from tests.mosquitto import mosquitto

TOPIC = "edgefleet/v1/test/link"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    with mosquitto(tmp_path / "broker") as port:
        yield f"mqtt://127.0.0.1:{port}"


def _link(url: str, client_id: str | None = None, **options: object) -> MqttLink:
    return MqttLink(
        url,
        client_id=client_id or f"link-{uuid.uuid4().hex[:8]}",
        backoff=Backoff(base=0.05, cap=0.2),
        **options,  # type: ignore[arg-type]
    )


class Listener:
    """A plain paho client that records the payloads published on ``TOPIC``."""

    def __init__(self, url: str) -> None:
        self.got: list[bytes] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="listener")
        self.client.on_message = lambda _c, _u, m: self.got.append(m.payload)
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.connect("127.0.0.1", int(url.rsplit(":", 1)[1]))
        self.client.loop_start()
        self.client.subscribe(TOPIC, qos=1)
        assert subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_publish_while_disconnected_says_whether_the_message_survives(broker: str) -> None:
    """QoS 0 while disconnected is dropped (False); QoS 1 is kept by paho and sent after the
    CONNACK (True, and it arrives); a full outgoing queue is False."""
    listener = Listener(broker)
    link = _link(broker)
    try:
        assert link.publish(TOPIC, b"qos0", qos=0) is False
        assert link.publish(TOPIC, b"qos1", qos=1) is True
        link.start()
        wait_for(lambda: b"qos1" in listener.got, 10, "the kept QoS 1 message")
        assert b"qos0" not in listener.got
    finally:
        link.stop()
        listener.close()
    offline = _link("mqtt://127.0.0.1:9")  # never started: everything stays queued
    results = [offline.publish(TOPIC, b"x", qos=1) for _ in range(10_001)]
    assert results[:10_000] == [True] * 10_000
    assert results[10_000] is False


def test_an_unacked_message_comes_back_to_the_kept_session(broker: str) -> None:
    """With a persistent session and manual acks, what the receiver acked is gone for good,
    and what it did not ack is delivered again when it reconnects under the same id. Acks
    leave in arrival order (MQTT-4.6.0-2): the ack of the third message waits behind the
    unacked second, so both come back."""
    client_id = f"keeper-{uuid.uuid4().hex[:6]}"
    received: list[Inbound] = []
    first = _link(broker, client_id, clean_session=False, manual_ack=True)
    first.subscribe_inbound(TOPIC, received.append)
    first.start()
    assert first.wait_subscribed(10)
    sender = _link(broker)
    sender.start()
    assert sender.wait_connected(10)
    for payload in (b"acked-1", b"left", b"acked-2"):
        sender.publish(TOPIC, payload, qos=1)
    wait_for(lambda: len(received) == 3, 10, "the three messages")
    ack_all(m for m in received if m.payload.startswith(b"acked"))
    wait_for(lambda: first.stats.acks == 1, 5, "the first ack to leave")
    time.sleep(0.2)
    assert first.stats.acks == 1, "the third ack waits for the second"
    first.stop()
    stale = next(m for m in received if m.payload == b"left")

    again: list[Inbound] = []
    second = _link(broker, client_id, clean_session=False, manual_ack=True)
    second.subscribe_inbound(TOPIC, again.append)
    second.start()
    try:
        wait_for(lambda: len(again) == 2, 10, "the redelivered messages")
        assert [m.payload for m in again] == [b"left", b"acked-2"]
        assert second.stats.session_present
        stale.ack()  # from the first connection: not sent on this one
        assert first.stats.stale_acks == 1
    finally:
        second.stop()
        sender.stop()
        assert second.forget_session()


def test_a_receiver_that_raises_does_not_hold_the_message_forever(broker: str) -> None:
    """An inbound handler that fails is logged and its message acked: it would otherwise
    hold one of the broker's inflight slots for the whole session."""
    link = _link(broker, clean_session=True, manual_ack=True)

    def broken(_message: Inbound) -> None:
        raise RuntimeError("bug")

    link.subscribe_inbound(TOPIC, broken)
    link.start()
    try:
        assert link.wait_connected(10)
        link.publish(TOPIC, b"x", qos=1)
        wait_for(lambda: link.stats.acks == 1, 10, "the ack of the failed message")
        assert link.stats.handler_errors == 1
    finally:
        link.stop()


def test_manual_acks_must_be_asked_for() -> None:
    """subscribe_inbound on an auto-ack link is a programming error, said at once."""
    with pytest.raises(ValueError, match="manual_ack"):
        _link("mqtt://127.0.0.1:9").subscribe_inbound(TOPIC, lambda _m: None)


def test_filters_match_as_paho_matches_them() -> None:
    """The compiled filter matcher agrees with paho's on wildcards, empty levels and $SYS
    topics, and ignores a shared subscription's group."""
    filters = ["#", "+", "a", "a/b", "a/+", "a/#", "+/b", "+/+", "a/+/c", "+/#", "$SYS/#", "/+"]
    topics = ["a", "a/b", "a/b/c", "b", "$SYS/x", "$SYS", "a//b", "/a", "a/", "x/b"]
    for pattern, topic in itertools.product(filters, topics):
        assert topic_matches(pattern, topic) == mqtt.topic_matches_sub(pattern, topic), (
            pattern,
            topic,
        )
    assert topic_matches("$share/edgefleet-cloud/a/+", "a/x")


def test_acks_leave_in_the_order_the_messages_came(broker: str) -> None:
    """Three messages acked last-first: nothing leaves until the first is acked, then all
    three go in arrival order, and none comes back to the kept session."""
    client_id = f"order-{uuid.uuid4().hex[:6]}"
    received: list[Inbound] = []
    link = _link(broker, client_id, clean_session=False, manual_ack=True)
    link.subscribe_inbound(TOPIC, received.append)
    link.start()
    assert link.wait_subscribed(10)
    sender = _link(broker)
    sender.start()
    try:
        assert sender.wait_connected(10)
        for payload in (b"1", b"2", b"3"):
            sender.publish(TOPIC, payload, qos=1)
        wait_for(lambda: len(received) == 3, 10, "the three messages")
        received[2].ack()
        received[1].ack()
        time.sleep(0.2)
        assert link.stats.acks == 0
        received[0].ack()
        wait_for(lambda: link.stats.acks == 3, 5, "all three acks")
    finally:
        link.stop()
        sender.stop()
    again: list[Inbound] = []
    second = _link(broker, client_id, clean_session=False, manual_ack=True)
    second.subscribe_inbound(TOPIC, again.append)
    second.start()
    try:
        assert second.wait_subscribed(10)
        time.sleep(0.5)
        assert again == []
    finally:
        second.stop()
        assert second.forget_session()


def test_acks_out_of_order_do_not_get_us_dropped_by_rumqttd(embedded: ServiceUrls) -> None:
    """rumqttd (the embedded broker) closes a client whose PUBACKs come out of order; before
    acks were put in order, the fleet service reconnected many times a second under load.
    Twenty messages acked in reverse: all acked, no disconnect."""
    received: list[Inbound] = []
    link = _link(embedded.mqtt_url, clean_session=False, manual_ack=True)
    link.subscribe_inbound(TOPIC, received.append)
    link.start()
    assert link.wait_subscribed(10)
    sender = _link(embedded.mqtt_url)
    sender.start()
    try:
        assert sender.wait_connected(10)
        for index in range(20):
            sender.publish(TOPIC, str(index).encode(), qos=1)
        wait_for(lambda: len(received) == 20, 10, "twenty messages")
        for item in reversed(received):
            item.ack()
        wait_for(lambda: link.stats.acks == 20, 5, "twenty acks")
        time.sleep(0.5)
        assert link.stats.disconnects == 0
        assert link.connected
    finally:
        link.stop()
        sender.stop()
        link.forget_session()


def test_in_flight_counts_what_the_broker_has_not_acknowledged(broker: str) -> None:
    """QoS 1 messages published while disconnected wait in paho: in_flight counts them (QoS 0
    is dropped, not counted). Once connected the broker acknowledges each, on_published is
    called for each, and in_flight is back to 0 — also after two threads publish at once,
    where an acknowledgement may arrive before publish() has returned."""
    acks: list[int] = []
    link = _link(broker, on_published=lambda: acks.append(1))
    for _ in range(5):
        assert link.publish(TOPIC, b"kept", qos=1)
    link.publish(TOPIC, b"dropped", qos=0)
    assert link.in_flight == 5
    link.start()
    try:
        wait_for(lambda: link.in_flight == 0, 10, "the kept messages acknowledged")
        assert len(acks) == 5

        def burst() -> None:
            for _ in range(500):
                link.publish(TOPIC, b"burst", qos=1)

        threads = [threading.Thread(target=burst) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wait_for(lambda: link.in_flight == 0, 30, "the burst acknowledged")
        assert len(acks) == 1005
    finally:
        link.stop()


class LossyProxy:
    """A TCP proxy in front of the broker that can lose everything the broker sends (its
    PUBACKs among it) and cut every connection, as a network that fails half way does."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.port = free_port()
        self.losing = False
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            self._sockets += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, from_broker: bool) -> None:
        try:
            while data := source.recv(65536):
                if not (from_broker and self.losing):
                    sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            end.close()

    def cut(self) -> None:
        for end in self._sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        self._sockets = []

    def close(self) -> None:
        self._server.close()
        self.cut()


@pytest.mark.parametrize("clean_session", [True, False], ids=["clean", "kept-session"])
def test_puback_lost_with_the_connection_still_ends_in_flight(
    tmp_path: Path, clean_session: bool
) -> None:
    """Eight QoS 1 messages go out while the broker's PUBACKs are lost on the way back, then
    the connection is cut: in_flight counts all eight meanwhile (the carousel waits on it);
    after the reconnect paho sends them again, the broker acknowledges them, and in_flight
    is back to 0 — the carousel is not held back for ever by acks that never came."""
    with mosquitto(tmp_path / "broker") as port:
        proxy = LossyProxy(port)
        acks: list[int] = []
        link = _link(
            f"mqtt://127.0.0.1:{proxy.port}", clean_session=clean_session,
            on_published=lambda: acks.append(1),
        )  # fmt: skip
        link.start()
        try:
            assert link.wait_connected(10)
            proxy.losing = True
            for index in range(8):
                assert link.publish(TOPIC, b"chunk %d" % index, qos=1)
            time.sleep(0.5)
            assert link.in_flight == 8
            assert acks == []
            proxy.losing = False
            proxy.cut()
            wait_for(lambda: link.in_flight == 0, 15, "the messages acknowledged after the cut")
            assert len(acks) == 8
            assert link.stats.connects >= 2
        finally:
            link.stop()
            proxy.close()  # the broker, and the kept session with it, goes at the end
