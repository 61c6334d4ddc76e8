"""Enrollment provisions the broker: through the real API, on a real Mosquitto with dynamic
security, a device logs in with its token and keeps to its own topics; deleting or
re-enrolling it takes the old login away; a broker that is down changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from cloud.embedded.services import ServiceUrls
from cloud.registry.tables import Device
from tests.brokers import DynsecBroker, MqttProbe, dynsec_cloud_api, dynsec_mosquitto, settle
from tests.cloud.api.helpers import snapshot
from tests.conftest import RunningApi

SHA = "ab" * 32
DEV = "edgefleet/v1/dev"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker") as running:
        yield running


@pytest.fixture
def api(tmp_path: Path, broker: DynsecBroker, embedded: ServiceUrls) -> Iterator[RunningApi]:
    with dynsec_cloud_api(tmp_path / "cloud", broker, embedded.redis_url) as running:
        yield running


@pytest.fixture
def probes() -> Iterator[list[MqttProbe]]:
    opened: list[MqttProbe] = []
    yield opened
    for probe in opened:
        probe.close()


def _registry(api: RunningApi) -> dict[str, Any]:
    """What a refused change must leave as it was: every row but the audit's, and tokens."""
    state = snapshot(api.context)
    state["rows"].pop("audit_events")
    with api.context.database.session() as s:
        state["tokens"] = sorted(s.execute(select(Device.id, Device.token_hash)).tuples())
    return state


def _enroll(api: RunningApi, device_id: str) -> str:
    with api.client() as c:
        r = c.post("/v1/devices", json={"device_id": device_id})
    assert r.status_code == 201, r.text
    token: str = r.json()["token"]
    return token


def _probe(
    probes: list[MqttProbe],
    broker: DynsecBroker,
    user: str | None,
    password: str | None,
    client_id: str | None = None,
) -> MqttProbe:
    probe = MqttProbe(broker.port, user, password, client_id=client_id or f"agent-{user}")
    probes.append(probe)
    return probe


def _cloud(probes: list[MqttProbe], broker: DynsecBroker) -> MqttProbe:
    cloud = _probe(probes, broker, broker.cloud_username, broker.cloud_password, "cloud-probe")
    assert cloud.connect()
    return cloud


def test_an_enrolled_device_logs_in_and_keeps_to_its_own_topics(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """cam-a reads its desired state, chunks and the budget and writes its own reports;
    it can neither read nor write cam-b's topics, and the cloud hears only what is cam-a's."""
    a = _probe(probes, broker, "cam-a", _enroll(api, "cam-a"))
    b = _probe(probes, broker, "cam-b", _enroll(api, "cam-b"))
    cloud = _cloud(probes, broker)
    assert cloud.subscribe(f"{DEV}/+/status")
    assert a.connect()
    assert b.connect()
    assert a.subscribe(f"{DEV}/cam-a/desired")
    assert a.subscribe(f"edgefleet/v1/artifacts/{SHA}/+")
    assert a.subscribe("edgefleet/v1/cloud/budget")
    assert b.subscribe(f"{DEV}/cam-b/#")
    assert b.subscribe(f"edgefleet/v1/artifacts/{SHA}/+")
    for theirs in (f"{DEV}/cam-b/desired", f"{DEV}/+/desired", "edgefleet/v1/#", "#"):
        assert not a.subscribe(theirs), theirs

    cloud.publish(f"{DEV}/cam-a/desired", b"desired for a")
    cloud.publish(f"{DEV}/cam-b/desired", b"desired for b")
    cloud.publish(f"edgefleet/v1/artifacts/{SHA}/0", b"chunk 0")
    cloud.publish("edgefleet/v1/cloud/budget", b"budget")
    a.publish(f"{DEV}/cam-a/status", b"status of a")
    a.publish(f"{DEV}/cam-b/status", b"forged status of b")
    a.publish(f"{DEV}/cam-b/desired", b"forged desired of b")
    a.publish(f"{DEV}/cam-a/desired", b"a clears its own desired")
    settle([a, b], f"edgefleet/v1/artifacts/{SHA}/1", cloud)
    settle([cloud], f"{DEV}/cam-a/status", a)

    got_a = [p for _t, p in a.messages if not p.startswith(b"marker-")]
    got_b = [p for _t, p in b.messages if not p.startswith(b"marker-")]
    heard = [p for _t, p in cloud.messages if not p.startswith(b"marker-")]
    assert got_a == [b"desired for a", b"chunk 0", b"budget"]
    assert got_b == [b"desired for b", b"chunk 0"]
    assert heard == [b"status of a"]


def test_logins_are_bound_to_the_device_and_its_client_id(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """Another device's client id, a wrong token, no login: all refused, nobody knocked off."""
    token_a, token_b = _enroll(api, "cam-a"), _enroll(api, "cam-b")
    b = _probe(probes, broker, "cam-b", token_b)
    assert b.connect()
    assert not _probe(probes, broker, "cam-a", token_a, client_id="agent-cam-b").connect()
    assert not _probe(probes, broker, "cam-a", token_a, client_id="someone-else").connect()
    assert not _probe(probes, broker, "cam-a", token_b).connect()
    assert not _probe(probes, broker, "cam-a", "efd_wrong").connect()
    assert not _probe(probes, broker, None, None, client_id="agent-cam-a").connect()
    assert _probe(probes, broker, "cam-a", token_a).connect()
    assert b.subscribe(f"{DEV}/cam-b/desired")
    assert b.disconnects == []


def test_deleting_a_device_closes_its_session_and_refuses_its_login(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    token = _enroll(api, "cam-a")
    connected = _probe(probes, broker, "cam-a", token)
    assert connected.connect()
    with api.client() as c:
        assert c.delete("/v1/devices/cam-a").status_code == 204
        assert c.get("/v1/devices/cam-a").status_code == 404
        assert c.delete("/v1/devices/cam-a").status_code == 404
        audit = c.get("/v1/audit").json()
    assert connected.wait(lambda: connected.disconnects)
    assert not _probe(probes, broker, "cam-a", token).connect()
    assert any(e["action"] == "device.delete" and e["subject"] == "cam-a" for e in audit)
    # The id is free again: enrolling it anew gives a working login.
    assert _probe(probes, broker, "cam-a", _enroll(api, "cam-a")).connect()


def test_rotating_a_token_replaces_the_login(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    old = _enroll(api, "cam-a")
    connected = _probe(probes, broker, "cam-a", old)
    assert connected.connect()
    with api.client() as c:
        r = c.post("/v1/devices/cam-a/token")
    assert r.status_code == 200, r.text
    new = r.json()["token"]
    assert new != old
    assert r.json()["device"]["id"] == "cam-a"
    assert connected.wait(lambda: connected.disconnects)
    assert not _probe(probes, broker, "cam-a", old).connect()
    fresh = _probe(probes, broker, "cam-a", new)
    assert fresh.connect()
    assert fresh.subscribe(f"{DEV}/cam-a/desired")
    with api.client(old) as device:
        assert device.get("/v1/device").status_code == 401
    with api.client(new) as device:
        assert device.get("/v1/device").status_code == 200


def test_a_broker_that_is_down_answers_503_and_changes_nothing(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    """Enroll, re-enroll and delete each need the broker; without it the registry stays
    (the rotation, stored first, is undone, and the audit says so)."""
    token = _enroll(api, "cam-a")
    broker.stop()
    before = _registry(api)
    with api.client() as c:
        for method, path, body in (
            ("POST", "/v1/devices", {"device_id": "cam-b"}),
            ("POST", "/v1/devices/cam-a/token", None),
            ("DELETE", "/v1/devices/cam-a", None),
        ):
            r = c.request(method, path, json=body)
            assert r.status_code == 503, (path, r.text)
            assert "broker" in r.json()["error"]
        assert c.get("/v1/devices/cam-b").status_code == 404
        audit = [(e["action"], e["subject"]) for e in c.get("/v1/audit").json()]
    assert _registry(api) == before
    assert audit[:3] == [
        ("device.rotate_token.undone", "cam-a"),
        ("device.rotate_token", "cam-a"),
        ("device.enroll", "cam-a"),
    ]
    with api.client(token) as device:
        assert device.get("/v1/device").status_code == 200

    broker.start()
    assert _probe(probes, broker, "cam-a", token).connect()
    assert _probe(probes, broker, "cam-b", _enroll(api, "cam-b")).connect()


def test_a_device_id_that_is_another_broker_login_is_a_conflict(
    api: RunningApi, broker: DynsecBroker, probes: list[MqttProbe]
) -> None:
    before = snapshot(api.context)
    with api.client() as c:
        r = c.post("/v1/devices", json={"device_id": broker.cloud_username})
    assert r.status_code == 409
    assert "error" in r.json()
    assert snapshot(api.context) == before
    _cloud(probes, broker)
