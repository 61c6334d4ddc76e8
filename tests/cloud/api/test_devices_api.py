"""Device enrollment, the device's own view, artifact download with Range."""

from __future__ import annotations

import base64
import hashlib
import sqlite3

import pytest

from cloud.api.routes import devices as devices_routes
from cloud.broker.provisioning import BrokerAccounts, broker_accounts
from cloud.settings import CloudSettings
from shared.signing import load_public_key
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import RunningApi
from tests.onnx_models import tiny_classifier


def test_enrollment_returns_a_token_once_and_the_key_to_pin(api: RunningApi) -> None:
    with api.client() as c:
        r = c.post("/v1/devices", json={"device_id": "cam-1", "labels": {"site": "lab"}})
        assert r.status_code == 201, r.text
        enrolled = r.json()
        assert enrolled["token"].startswith("efd_")
        assert enrolled["mqtt_url"] == api.context.urls.mqtt_url
        load_public_key(enrolled["public_key"])
        listed = c.get("/v1/devices").json()
        assert [d["id"] for d in listed] == ["cam-1"]
        assert "token" not in listed[0]
        assert c.get("/v1/devices", params={"label": "site=lab"}).json()[0]["id"] == "cam-1"
        assert c.get("/v1/devices", params={"label": "site=other"}).json() == []
        assert c.get("/v1/devices/cam-1").json()["labels"] == {"site": "lab"}
    with api.client(enrolled["token"]) as device:
        me = device.get("/v1/device").json()
    assert me["device"]["id"] == "cam-1"
    assert me["public_key"] == enrolled["public_key"]


@pytest.mark.parametrize(
    "body",
    [
        {"device_id": "bad/id"},
        {"device_id": "ok", "labels": {"k": "v with space"}},
        {"device_id": "ok", "extra": True},
        {},
    ],
)
def test_bad_enrollments_are_refused_and_change_nothing(api: RunningApi, body: dict) -> None:  # type: ignore[type-arg]
    before = snapshot(api.context)
    with api.client() as c:
        r = c.post("/v1/devices", json=body)
    assert r.status_code == 422
    assert "error" in r.json()
    assert snapshot(api.context) == before


def test_enrolling_twice_is_a_conflict_and_unknown_devices_are_404(api: RunningApi) -> None:
    with api.client() as c:
        assert c.post("/v1/devices", json={"device_id": "d"}).status_code == 201
        before = snapshot(api.context)
        assert c.post("/v1/devices", json={"device_id": "d"}).status_code == 409
        assert c.get("/v1/devices/zzz").status_code == 404
        assert c.get("/v1/devices", params={"label": "nokey"}).status_code == 400
    assert snapshot(api.context) == before


def test_the_device_endpoint_needs_a_device_token(api: RunningApi) -> None:
    with api.client("efd_forged") as c:
        assert c.get("/v1/device").status_code == 401


def test_artifacts_download_whole_and_by_range(api: RunningApi) -> None:
    data = tiny_classifier(features=300, classes=20)
    with api.client() as c:
        c.post("/v1/models", json={"name": "m"})
        sha = upload(c, "m", data).json()["sha256"]
    with api.client() as device:  # the admin downloads any artifact (devices: tests/security)
        whole = device.get(f"/v1/artifacts/{sha}")
        part = device.get(f"/v1/artifacts/{sha}", headers={"Range": "bytes=100-199"})
        tail = device.get(f"/v1/artifacts/{sha}", headers={"Range": f"bytes={len(data) - 10}-"})
        index = device.get(f"/v1/artifacts/{sha}/chunks").json()
        beyond = device.get(f"/v1/artifacts/{sha}", headers={"Range": f"bytes={len(data) + 5}-"})
        missing = device.get(f"/v1/artifacts/{'0' * 64}")
        bad = device.get("/v1/artifacts/not-a-hash")
    assert whole.content == data
    assert hashlib.sha256(whole.content).hexdigest() == sha
    assert (part.status_code, part.content) == (206, data[100:200])
    assert tail.content == data[-10:]
    assert index["chunks"][0] == hashlib.sha256(data[:4096]).hexdigest()
    assert len(index["chunks"]) == -(-len(data) // 4096)
    assert beyond.status_code == 416
    assert missing.status_code == 404
    assert bad.status_code == 400


def test_artifacts_need_a_token(api: RunningApi) -> None:
    with api.client(None) as c:
        assert c.get(f"/v1/artifacts/{'0' * 64}").status_code == 401


def test_health_readiness_metrics_and_openapi(api: RunningApi) -> None:
    with api.client(None) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"database": "ok", "redis": "ok", "mqtt": "ok"}
        c.get("/v1/models")
        metrics = c.get("/metrics").text
        assert (
            'edgefleet_http_requests_total{method="GET",route="/v1/models",status="401"}' in metrics
        )
        assert 'edgefleet_registry_rows{kind="models"} 0.0' in metrics
        spec = c.get("/openapi.json").json()
        assert "/v1/models/{name}/versions" in spec["paths"]
    _ = base64


def test_readiness_says_which_dependency_is_down(api: RunningApi) -> None:
    """Point the context at a Redis port with nothing on it: 503 naming redis."""
    import redis

    from cloud.embedded.processes import free_port

    live = api.context.redis
    api.context.redis = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    try:
        with api.client(None) as c:
            r = c.get("/readyz")
    finally:
        api.context.redis = live
    assert r.status_code == 503
    assert r.json()["error"] == "not ready: redis down"


class LockProbe:
    """The broker accounts the routes use, checking on each call that SQLite's write lock is
    free: a slow broker (several waits of broker_timeout_s) must not hold it, or every other
    writer fails with "database is locked" once busy_timeout is out."""

    def __init__(self, inner: BrokerAccounts, database_path: str) -> None:
        self.inner = inner
        self.path = database_path
        self.calls: list[tuple[str, bool]] = []

    def _write_lock_free(self) -> bool:
        connection = sqlite3.connect(self.path, timeout=0)
        try:
            connection.execute("BEGIN IMMEDIATE")
            connection.rollback()
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            connection.close()

    def provision_device(self, device_id: str, password: str) -> None:
        self.calls.append(("provision", self._write_lock_free()))
        self.inner.provision_device(device_id, password)

    def remove_device(self, device_id: str) -> None:
        self.calls.append(("remove", self._write_lock_free()))
        self.inner.remove_device(device_id)


def test_the_broker_is_asked_while_no_database_write_lock_is_held(
    api: RunningApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enroll, rotate and delete on SQLite: while each waits on the broker, another writer
    can write (the registry's row is written before or after, never across the wait)."""
    path = api.context.database.engine.url.database
    assert path is not None
    probes: list[LockProbe] = []

    def accounts(settings: CloudSettings, mqtt_url: str) -> BrokerAccounts:
        probes.append(LockProbe(broker_accounts(settings, mqtt_url), path))
        return probes[-1]

    monkeypatch.setattr(devices_routes, "broker_accounts", accounts)
    with api.client() as c:
        assert c.post("/v1/devices", json={"device_id": "cam-1"}).status_code == 201
        assert c.post("/v1/devices/cam-1/token").status_code == 200
        assert c.delete("/v1/devices/cam-1").status_code == 204
    assert [call for probe in probes for call in probe.calls] == [
        ("provision", True),
        ("provision", True),
        ("remove", True),
    ]
