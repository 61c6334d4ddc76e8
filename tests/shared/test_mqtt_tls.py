"""MqttLink over TLS on a real Mosquitto with a TLS listener and a CA made by the test: the
broker's certificate must chain to the CA and name the host, a broker that requires client
certificates gets one, and a bad TLS file is a clear error before anything connects."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from shared.mqtt_link import MqttLink
from shared.mqtt_tls import MqttTls, parse_mqtt_url
from shared.retry import Backoff
from tests.fleet_harness import wait_for
from tests.mosquitto import tls_mosquitto
from tests.pki import Pki, make_pki

TOPIC = "edgefleet/v1/test/tls"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _link(url: str, tls: MqttTls | None, **options: object) -> MqttLink:
    return MqttLink(
        url,
        client_id=f"tls-{uuid.uuid4().hex[:8]}",
        backoff=Backoff(base=0.05, cap=0.2),
        tls=tls,
        **options,  # type: ignore[arg-type]
    )


def _never_connects(link: MqttLink) -> None:
    """One whole attempt ends (the backoff starts) and the link never said it was up."""
    link.start()
    try:
        wait_for(lambda: link.stats.reconnect_delays, 10, "a connection attempt to end")
        assert not link.connected
        assert link.stats.connects == 0
        assert link.stats.tls_failures >= 1
    finally:
        link.stop()


def test_urls_say_whether_the_link_is_tls_and_default_the_port() -> None:
    """mqtts:// is TLS on 8883 unless a port is given; mqtt:// and tcp:// are plain."""
    assert parse_mqtt_url("mqtts://broker.example") == parse_mqtt_url("mqtts://broker.example:8883")
    assert parse_mqtt_url("mqtts://broker.example").tls
    assert parse_mqtt_url("mqtt://broker.example").port == 1883
    assert not parse_mqtt_url("tcp://broker.example:1884").tls
    with pytest.raises(ValueError, match="unsupported MQTT URL"):
        parse_mqtt_url("ws://broker.example")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("mqtt://", "names no host"),
        ("mqtts://:8883", "names no host"),
        ("mqtt://cloud:s3cret@broker.example:1883", "must not carry a login"),
        ("mqtts://device@broker.example", "must not carry a login"),
        ("mqtt://broker.example:0", "port 0"),
        ("ws://cloud:s3cret@broker.example", "unsupported MQTT URL"),
        ("mqtt://broker.example:99999", "invalid port"),
    ],
)
def test_a_url_without_a_host_with_a_login_or_port_0_is_refused(url: str, why: str) -> None:
    """A URL with no host used to mean 127.0.0.1 without a word; a login in it would be
    logged and shown with the URL (the login has settings of its own); port 0 is no broker.
    Each is refused with the reason, and no message repeats a password."""
    with pytest.raises(ValueError, match=why) as refused:
        parse_mqtt_url(url)
    assert "s3cret" not in str(refused.value)


def test_a_link_that_trusts_the_brokers_ca_round_trips_a_qos1_message(
    tmp_path: Path, pki: Pki
) -> None:
    """Two links over mqtts://: what one publishes at QoS 1 reaches the other; the session
    forgotten afterwards goes through TLS too (its client has the same settings)."""
    with tls_mosquitto(tmp_path / "broker", pki) as port:
        url = f"mqtts://127.0.0.1:{port}"
        tls = MqttTls(ca_file=pki.ca_file)
        got: list[bytes] = []
        arrived = threading.Event()

        def on_message(_topic: str, payload: bytes) -> None:
            got.append(payload)
            arrived.set()

        receiver = _link(url, tls, clean_session=False)
        receiver.subscribe(TOPIC, on_message, qos=1)
        sender = _link(f"mqtts://localhost:{port}", tls)
        receiver.start()
        sender.start()
        try:
            assert receiver.wait_subscribed(10)
            assert sender.wait_connected(10)
            assert sender.publish(TOPIC, b"over tls", qos=1)
            assert arrived.wait(10)
            assert got == [b"over tls"]
        finally:
            sender.stop()
            receiver.stop()
        assert receiver.forget_session()
        assert receiver.stats.tls_failures == sender.stats.tls_failures == 0


def test_a_link_with_another_ca_is_refused(tmp_path: Path, pki: Pki) -> None:
    """A broker whose certificate another CA signed is not trusted: never connected."""
    stranger = make_pki(tmp_path / "stranger")
    with tls_mosquitto(tmp_path / "broker", pki) as port:
        link = _link(f"mqtts://127.0.0.1:{port}", MqttTls(ca_file=stranger.ca_file))
        _never_connects(link)
        assert not link.forget_session(timeout=2)


def test_a_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    """The right CA is not enough: the broker's certificate must name the host we dial."""
    elsewhere = make_pki(tmp_path / "pki", server_names=("broker.example",))
    with tls_mosquitto(tmp_path / "broker", elsewhere) as port:
        _never_connects(_link(f"mqtts://127.0.0.1:{port}", MqttTls(ca_file=elsewhere.ca_file)))


def test_a_plain_link_to_a_tls_listener_never_connects(tmp_path: Path, pki: Pki) -> None:
    """The test broker takes TLS only: what connects in the other stories spoke TLS."""
    with tls_mosquitto(tmp_path / "broker", pki) as port:
        link = _link(f"mqtt://127.0.0.1:{port}", None)
        link.start()
        try:
            wait_for(lambda: link.stats.reconnect_delays, 10, "a connection attempt to end")
            assert not link.connected
        finally:
            link.stop()


def test_a_broker_that_requires_client_certificates_takes_only_links_with_one(
    tmp_path: Path, pki: Pki
) -> None:
    """With ``require_certificate true`` a link without a client certificate is refused; one
    with a certificate the broker's CA signed connects."""
    with tls_mosquitto(tmp_path / "broker", pki, require_certificate="true") as port:
        url = f"mqtts://127.0.0.1:{port}"
        _never_connects(_link(url, MqttTls(ca_file=pki.ca_file)))
        with_cert = _link(url, MqttTls(pki.ca_file, pki.client_cert, pki.client_key))
        with_cert.start()
        try:
            assert with_cert.wait_connected(10)
        finally:
            with_cert.stop()


def test_bad_tls_files_are_clear_errors_before_any_connection(tmp_path: Path, pki: Pki) -> None:
    """Refused when the link is made, naming the file and what is wrong with it."""
    url = "mqtts://127.0.0.1:8883"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    # An encrypted key would make OpenSSL prompt on the terminal: a service would hang.
    locked = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), password=None)
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    cases = {
        MqttTls(ca_file=tmp_path / "missing.pem"): r"missing\.pem: No such file",
        MqttTls(ca_file=junk): r"junk\.pem: no usable PEM certificate",
        MqttTls(pki.ca_file, pki.client_cert, pki.server_key): "does not belong",
        MqttTls(pki.ca_file, None, pki.client_key): "without its certificate",
        MqttTls(pki.ca_file, junk, pki.client_key): "not a PEM certificate and private key",
        MqttTls(pki.ca_file, pki.client_cert, locked): "it is encrypted",
    }
    for tls, message in cases.items():
        with pytest.raises(ValueError, match=message):
            _link(url, tls)
    with pytest.raises(ValueError, match="use mqtts://"):
        _link("mqtt://127.0.0.1:1883", MqttTls(ca_file=pki.ca_file))
