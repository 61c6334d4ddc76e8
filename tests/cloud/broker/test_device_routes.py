"""Deleting and re-enrolling devices with broker accounts off (the embedded broker): the
registry side alone, audited, admin only, and a device's history goes with it."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import func, select

from cloud.registry import repository
from cloud.registry.database import Database
from cloud.registry.tables import DeploymentEvent
from tests.conftest import RunningApi


def _events(database: Database, device_id: str) -> int:
    with database.session() as s:
        count = s.scalar(
            select(func.count())
            .select_from(DeploymentEvent)
            .where(DeploymentEvent.device_id == device_id)
        )
    return int(count or 0)


def test_deleting_a_device_removes_it_and_its_history(database: Database) -> None:
    """On SQLite and PostgreSQL alike: the row and its deployment events are gone."""
    with database.session() as s:
        repository.enroll_device(s, device_id="cam-1")
        repository.enroll_device(s, device_id="cam-2")
        for device_id in ("cam-1", "cam-2"):
            s.add(DeploymentEvent(device_id=device_id, rev=1, state="ACTIVE", at=datetime.now(UTC)))
    with database.session() as s:
        repository.delete_device(s, device_id="cam-1")
    assert (_events(database, "cam-1"), _events(database, "cam-2")) == (0, 1)
    with database.session() as s:
        assert [d.id for d in repository.list_devices(s)] == ["cam-2"]


def test_delete_and_rotate_over_the_api(api: RunningApi) -> None:
    with api.client() as c:
        old = c.post("/v1/devices", json={"device_id": "cam-1"}).json()["token"]
        rotated = c.post("/v1/devices/cam-1/token")
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()["token"]
        assert rotated.json()["mqtt_url"] == api.context.urls.mqtt_url
        with api.client(old) as device:
            assert device.get("/v1/device").status_code == 401
        with api.client(new) as device:
            assert device.get("/v1/device").json()["device"]["id"] == "cam-1"
        assert c.delete("/v1/devices/cam-1").status_code == 204
        with api.client(new) as device:
            assert device.get("/v1/device").status_code == 401
        assert c.post("/v1/devices/cam-1/token").status_code == 404
        assert c.delete("/v1/devices/cam-1").status_code == 404
        actions = [(e["action"], e["subject"]) for e in c.get("/v1/audit").json()]
    assert actions[:3] == [
        ("device.delete", "cam-1"),
        ("device.rotate_token", "cam-1"),
        ("device.enroll", "cam-1"),
    ]


def test_only_an_admin_deletes_or_rotates(api: RunningApi) -> None:
    with api.client() as c:
        token = c.post("/v1/devices", json={"device_id": "cam-1"}).json()["token"]
    with api.client(token) as device:
        assert device.delete("/v1/devices/cam-1").status_code == 401
        assert device.post("/v1/devices/cam-1/token").status_code == 401
        assert device.get("/v1/device").status_code == 200
