"""Enrollment, rotation and deletion when the registry fails half-way, on a real Mosquitto with
dynamic security: the broker and the registry end up agreeing, or with less access."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from cloud.api.routes import devices as devices_routes
from cloud.broker.provisioning import BrokerAccounts, DynsecAccounts, broker_accounts
from cloud.embedded.services import ServiceUrls
from cloud.registry import repository
from cloud.settings import CloudSettings
from tests.brokers import DynsecBroker, MqttProbe, dynsec_cloud_api, dynsec_mosquitto
from tests.conftest import RunningApi


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def api(tmp_path: Path, broker: DynsecBroker, embedded: ServiceUrls) -> Iterator[RunningApi]:
    with dynsec_cloud_api(tmp_path / "cloud", broker, embedded.redis_url) as running:
        yield running


@contextmanager
def failing_commit(engine: Engine, statement: str) -> Iterator[list[str]]:
    """The commit of the next transaction that runs ``statement…`` fails, as a full disk or
    a lost connection makes it; yields the statements it failed."""
    armed: list[Any] = []
    failed: list[str] = []

    def before(conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if sql.startswith(statement) and not failed:
            armed.append(conn)

    def on_commit(conn: Any) -> None:
        if conn in armed:
            armed.clear()
            failed.append(statement)
            raise OperationalError("COMMIT", None, sqlite3.OperationalError("disk I/O error"))

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "commit", on_commit)
    try:
        yield failed
    finally:
        event.remove(engine, "commit", on_commit)
        event.remove(engine, "before_cursor_execute", before)


def _enroll(api: RunningApi, device_id: str) -> str:
    with api.client() as c:
        r = c.post("/v1/devices", json={"device_id": device_id})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def _logs_in(broker: DynsecBroker, device_id: str, token: str) -> bool:
    probe = MqttProbe(broker.port, device_id, token, client_id=f"agent-{device_id}")
    try:
        return probe.connect()
    finally:
        probe.close()


def _login_of(broker: DynsecBroker, device_id: str) -> dict[str, Any] | None:
    accounts = DynsecAccounts(
        broker.url, username=broker.cloud_username, password=broker.cloud_password
    )
    with accounts.connect() as dynsec:
        return dynsec.get_client(device_id)


def test_an_enrollment_the_registry_fails_to_store_leaves_no_broker_login(
    api: RunningApi, broker: DynsecBroker
) -> None:
    engine = api.context.database.engine
    with failing_commit(engine, "INSERT INTO devices") as failed, api.client() as c:
        r = c.post("/v1/devices", json={"device_id": "cam-b"})
    assert failed
    assert r.status_code == 503, r.text
    assert "not enrolled" in r.json()["error"]
    with api.client() as c:
        assert c.get("/v1/devices/cam-b").status_code == 404
    assert _login_of(broker, "cam-b") is None


def test_a_rotation_the_registry_fails_to_store_leaves_the_old_token_working(
    api: RunningApi, broker: DynsecBroker
) -> None:
    """The broker is only asked once the new token's hash is stored: a registry that fails
    first leaves the old token working on the API and on the broker."""
    token = _enroll(api, "cam-a")
    engine = api.context.database.engine
    with failing_commit(engine, "UPDATE devices SET token_hash") as failed, api.client() as c:
        r = c.post("/v1/devices/cam-a/token")
    assert failed
    assert r.status_code == 503, r.text
    assert "not rotated" in r.json()["error"]
    assert _logs_in(broker, "cam-a", token)
    with api.client(token) as device:
        assert device.get("/v1/device").status_code == 200


def test_a_deletion_the_registry_fails_to_store_leaves_no_access_and_can_be_repeated(
    api: RunningApi, broker: DynsecBroker
) -> None:
    """The login goes first: a registry that then fails leaves a device without broker
    access (never the reverse), and the answer says to delete it again, which works."""
    token = _enroll(api, "cam-a")
    engine = api.context.database.engine
    with failing_commit(engine, "DELETE FROM devices") as failed, api.client() as c:
        r = c.delete("/v1/devices/cam-a")
    assert failed
    assert r.status_code == 503, r.text
    assert "delete it again" in r.json()["error"]
    assert not _logs_in(broker, "cam-a", token)
    with api.client() as c:
        assert c.get("/v1/devices/cam-a").status_code == 200
        assert c.delete("/v1/devices/cam-a").status_code == 204
        assert c.get("/v1/devices/cam-a").status_code == 404


def test_a_device_deleted_elsewhere_during_its_rotation_is_a_404_and_keeps_no_login(
    api: RunningApi, broker: DynsecBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another replica deletes the device while this one asks the broker for its new login:
    the rotation answers 404 (not a 500 from a stale row) and takes that login away again."""
    token = _enroll(api, "cam-a")
    deleted = threading.Event()

    class DeletedMeanwhile:
        def __init__(self, inner: BrokerAccounts) -> None:
            self.inner = inner

        def provision_device(self, device_id: str, password: str) -> None:
            with api.context.database.session() as s:
                repository.delete_device(s, device_id=device_id)
            deleted.set()
            self.inner.provision_device(device_id, password)

        def remove_device(self, device_id: str) -> None:
            self.inner.remove_device(device_id)

    def accounts(settings: CloudSettings, mqtt_url: str) -> BrokerAccounts:
        return DeletedMeanwhile(broker_accounts(settings, mqtt_url))

    monkeypatch.setattr(devices_routes, "broker_accounts", accounts)
    with api.client() as c:
        r = c.post("/v1/devices/cam-a/token")
    assert deleted.is_set()
    assert r.status_code == 404, r.text
    assert _login_of(broker, "cam-a") is None
    assert not _logs_in(broker, "cam-a", token)
