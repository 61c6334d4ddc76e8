"""Cloud settings are validated once; a default secret outside dev mode is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud.settings import DEV_ADMIN_TOKEN, CloudSettings
from shared.mqtt_tls import MqttTls
from tests.pki import make_pki


def test_the_built_in_token_is_refused_outside_dev_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEFLEET_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("EDGEFLEET_DEV_MODE", raising=False)
    with pytest.raises(ValidationError, match="built-in development token"):
        CloudSettings()
    assert CloudSettings(dev_mode=True).admin_token == DEV_ADMIN_TOKEN


def test_short_tokens_and_unknown_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16"):
        CloudSettings(admin_token="short")
    with pytest.raises(ValidationError, match="Extra inputs"):
        CloudSettings(dev_mode=True, no_such_setting=1)  # type: ignore[call-arg]


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFLEET_ADMIN_TOKEN", "x" * 32)
    monkeypatch.setenv("EDGEFLEET_DATABASE_URL", "postgresql://db/edgefleet")
    settings = CloudSettings()
    assert settings.resolved_database_url == "postgresql://db/edgefleet"
    assert not settings.dev_mode


def test_broker_tls_files_come_from_the_environment_and_are_checked_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EDGEFLEET_MQTT_CA_FILE/_CERT_FILE/_KEY_FILE secure an mqtts:// broker; a file that is
    missing, or TLS files for a plain (or the embedded) broker, stop the start with a reason."""
    pki = make_pki(tmp_path / "pki")
    monkeypatch.setenv("EDGEFLEET_MQTT_URL", "mqtts://broker.example")
    monkeypatch.setenv("EDGEFLEET_MQTT_CA_FILE", str(pki.ca_file))
    monkeypatch.setenv("EDGEFLEET_MQTT_CERT_FILE", str(pki.client_cert))
    monkeypatch.setenv("EDGEFLEET_MQTT_KEY_FILE", str(pki.client_key))
    settings = CloudSettings(dev_mode=True)
    assert settings.mqtt_tls == MqttTls(pki.ca_file, pki.client_cert, pki.client_key)
    assert CloudSettings(dev_mode=True, mqtt_ca_file=None, mqtt_cert_file=None,
                         mqtt_key_file=None).mqtt_tls is None  # fmt: skip

    with pytest.raises(ValidationError, match=r"MQTT CA file \S*missing\.pem: No such file"):
        CloudSettings(dev_mode=True, mqtt_ca_file=tmp_path / "missing.pem")
    for plain in ("mqtt://broker.example", None):
        with pytest.raises(ValidationError, match=r"EDGEFLEET_MQTT_URL=mqtts://"):
            CloudSettings(dev_mode=True, mqtt_url=plain)
    with pytest.raises(ValidationError, match="unsupported MQTT URL"):
        CloudSettings(dev_mode=True, mqtt_url="ws://broker.example", mqtt_ca_file=None)


def test_broker_logins_never_cross_the_network_in_clear_outside_dev_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With EDGEFLEET_BROKER_ACCOUNTS=dynsec the cloud's admin password and every device's
    token are MQTT passwords: outside dev mode a plain mqtt:// broker URL (the cloud's or the
    one devices are told) is refused, unless the operator says the network is private
    (EDGEFLEET_ALLOW_PLAINTEXT_MQTT=true) or the broker is on this host (loopback)."""
    base = {"admin_token": "t" * 20, "broker_accounts": "dynsec", "mqtt_username": "cloud",
            "mqtt_password": "s3cret-admin"}  # fmt: skip
    for urls in (
        {"mqtt_url": "mqtt://broker.example"},
        {"mqtt_url": "mqtts://broker.example", "device_mqtt_url": "tcp://10.0.0.5:1883"},
    ):
        with pytest.raises(ValidationError, match="EDGEFLEET_ALLOW_PLAINTEXT_MQTT") as refused:
            CloudSettings(**base, **urls)  # type: ignore[arg-type]
        assert "s3cret-admin" not in str(refused.value)
        assert CloudSettings(**base, **urls, allow_plaintext_mqtt=True)  # type: ignore[arg-type]
        assert CloudSettings(**base | {"dev_mode": True}, **urls)  # type: ignore[arg-type]
        assert CloudSettings(**base | {"broker_accounts": "none"}, **urls)  # type: ignore[arg-type]
    for local in ("mqtt://127.0.0.1:1883", "mqtt://localhost", "mqtt://[::1]:1883"):
        assert CloudSettings(**base, mqtt_url=local)  # type: ignore[arg-type]
    assert CloudSettings(**base, mqtt_url="mqtts://broker.example")  # type: ignore[arg-type]
    monkeypatch.setenv("EDGEFLEET_ALLOW_PLAINTEXT_MQTT", "true")
    assert CloudSettings(**base, mqtt_url="mqtt://broker.example").allow_plaintext_mqtt  # type: ignore[arg-type]
