"""The dynamic-security client on a real Mosquitto: answers matched to requests, every failure
a bounded ServiceUnavailable, and logins enrollment did not make left alone."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloud.broker.dynsec import Command, DynsecClient, DynsecRefused
from cloud.broker.provisioning import DynsecAccounts
from cloud.broker.setup import plugin_conf, write_dynsec_config
from cloud.embedded.processes import ChildProcess, free_port
from shared.errors import Conflict, ServiceUnavailable
from tests.brokers import DynsecBroker, MqttProbe, mosquitto_with_plugin


def _admin(broker: DynsecBroker, **overrides: object) -> DynsecClient:
    options: dict[str, object] = {
        "username": broker.cloud_username,
        "password": broker.cloud_password,
        "timeout": 2.0,
    }
    options.update(overrides)
    return DynsecClient(broker.url, **options)  # type: ignore[arg-type]


def _can_log_in(broker: DynsecBroker, user: str, password: str, client_id: str) -> bool:
    probe = MqttProbe(broker.port, user, password, client_id=client_id)
    try:
        return probe.connect()
    finally:
        probe.close()


def test_concurrent_requests_on_one_connection_get_their_own_answers(
    broker: DynsecBroker,
) -> None:
    """Eight threads share one admin connection; each reads back the login it asked for."""
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    names = [f"cam-{i}" for i in range(8)]
    for name in names:
        accounts.provision_device(name, f"token-{name}")
    with _admin(broker) as dynsec, ThreadPoolExecutor(8) as pool:
        records = list(pool.map(lambda n: dynsec.get_client(n), names * 3))
    assert [r["username"] if r else None for r in records] == names * 3
    assert all(r and r["clientid"] == f"agent-{r['username']}" for r in records)


def test_the_plugin_refusing_a_command_is_an_error_with_its_reason(broker: DynsecBroker) -> None:
    with _admin(broker) as dynsec:
        with pytest.raises(DynsecRefused, match="Unknown command"):
            dynsec.run([Command("noSuchCommand")])
        assert dynsec.get_client("nobody") is None
        # A tolerated error counts as done; the connection keeps working after refusals.
        dynsec.run([Command("deleteRole", {"rolename": "none"}, tolerate=("Role not found",))])


def test_a_broker_that_is_down_refuses_or_is_silent_is_service_unavailable(
    broker: DynsecBroker, tmp_path: Path
) -> None:
    """Down, a wrong password, a login without dynsec rights, no plugin: each a clear 503."""
    with pytest.raises(ServiceUnavailable, match="unreachable"):
        DynsecClient(f"mqtt://127.0.0.1:{free_port()}", username="u", password="p").connect()
    with pytest.raises(ServiceUnavailable, match="refused the cloud's login"):
        _admin(broker, password="wrong").connect()
    DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    ).provision_device("cam-1", "token-1")
    with pytest.raises(ServiceUnavailable, match="may not use dynamic security"):
        _admin(broker, username="cam-1", password="token-1", client_id="agent-cam-1").connect()

    # A broker without the plugin takes the command and never answers: bounded by timeout.
    port = free_port()
    conf = tmp_path / "plain.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    plain = ChildProcess([mosquitto_with_plugin()[0], "-c", str(conf)])
    plain.start(host="127.0.0.1", port=port, timeout=10)
    try:
        client = DynsecClient(f"mqtt://127.0.0.1:{port}", username="u", password="p", timeout=0.5)
        with client, pytest.raises(ServiceUnavailable, match="no answer"):
            client.get_client("anyone")
    finally:
        plain.stop()


def test_logins_enrollment_did_not_make_are_never_replaced_or_deleted(
    broker: DynsecBroker,
) -> None:
    """A device id equal to the cloud's own username: provisioning refuses, removal skips it."""
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    with pytest.raises(Conflict, match="not a device's"):
        accounts.provision_device(broker.cloud_username, "hijack")
    accounts.remove_device(broker.cloud_username)
    assert _can_log_in(broker, broker.cloud_username, broker.cloud_password, "cloud-x")
    assert not _can_log_in(broker, broker.cloud_username, "hijack", "cloud-y")


def test_a_broker_configured_from_plugin_conf_provisions_devices(tmp_path: Path) -> None:
    """What an embedded Mosquitto would run: a listener, plugin_conf(), and the set-up file."""
    binary, plugin = mosquitto_with_plugin()
    port = free_port()
    dynsec_file = tmp_path / "dynsec.json"
    write_dynsec_config(dynsec_file, cloud_username="cloud", cloud_password="cloud-password")
    conf = tmp_path / "mosquitto.conf"
    # "user root" only matters when run as root: it keeps Mosquitto able to write tmp_path.
    conf.write_text(f"listener {port} 127.0.0.1\n{plugin_conf(dynsec_file, plugin)}user root\n")
    process = ChildProcess([binary, "-c", str(conf)])
    process.start(host="127.0.0.1", port=port, timeout=10)
    try:
        url = f"mqtt://127.0.0.1:{port}"
        DynsecAccounts(url, username="cloud", password="cloud-password").provision_device(
            "cam-1", "token-1"
        )
        device = MqttProbe(port, "cam-1", "token-1", client_id="agent-cam-1")
        anonymous = MqttProbe(port, None, None)
        try:
            assert device.connect()
            assert not anonymous.connect()
        finally:
            device.close()
            anonymous.close()
    finally:
        process.stop()


def test_answers_meant_for_another_admin_connection_are_no_warning(
    broker: DynsecBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """The plugin answers on one topic, so every admin connection receives every answer:
    concurrent enrollments must not fill the log with warnings about each other's."""
    caplog.set_level(logging.DEBUG, logger="cloud.broker.dynsec")
    with _admin(broker) as first, _admin(broker) as second:
        assert first.get_client("nobody") is None
        # The second connection receives the first's answer before its own.
        assert second.get_client("nobody") is None
    records = [r for r in caplog.records if r.name == "cloud.broker.dynsec"]
    assert any("no request of ours" in r.getMessage() for r in records)
    assert [r.getMessage() for r in records if r.levelno >= logging.WARNING] == []
