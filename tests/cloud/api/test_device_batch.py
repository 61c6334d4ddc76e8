"""Bulk enrollment over the API (no broker logins here): all devices or none, each with a
token of its own, audited like one enrollment; bad batches are clear 4xx answers."""

from __future__ import annotations

from tests.cloud.api.helpers import snapshot
from tests.conftest import RunningApi


def test_a_batch_enrolls_every_device_with_its_own_token(api: RunningApi) -> None:
    devices = [{"device_id": f"cam-{i}", "labels": {"site": "lab"}} for i in range(5)]
    with api.client() as c:
        r = c.post("/v1/devices/bulk", json={"devices": devices})
        assert r.status_code == 201, r.text
        body = r.json()
        audit = [(e["action"], e["subject"]) for e in c.get("/v1/audit").json()]
    assert body["mqtt_url"] == api.context.urls.mqtt_url
    assert [d["device"]["id"] for d in body["devices"]] == [f"cam-{i}" for i in range(5)]
    assert len({d["token"] for d in body["devices"]}) == 5
    assert sorted(audit) == sorted(("device.enroll", f"cam-{i}") for i in range(5))
    for item in body["devices"]:
        with api.client(item["token"]) as device:
            me = device.get("/v1/device").json()
        assert me["device"]["id"] == item["device"]["id"]
        assert me["device"]["labels"] == {"site": "lab"}
        assert me["public_key"] == body["public_key"]


def test_a_batch_with_an_enrolled_or_repeated_device_changes_nothing(api: RunningApi) -> None:
    """One device already enrolled: 409 naming it; one named twice: 400; an empty or
    oversized batch, or a bad id: 4xx. The registry is as it was after each."""
    with api.client() as c:
        assert c.post("/v1/devices", json={"device_id": "cam-1"}).status_code == 201
        before = snapshot(api.context)
        batches = [
            ([{"device_id": "cam-0"}, {"device_id": "cam-1"}], 409, "cam-1"),
            ([{"device_id": "cam-2"}, {"device_id": "cam-2"}], 400, "cam-2"),
            ([], 422, "devices"),
            ([{"device_id": f"d-{i}"} for i in range(1001)], 422, "devices"),
            ([{"device_id": "bad/id"}], 422, "device_id"),
        ]
        for devices, status, named in batches:
            r = c.post("/v1/devices/bulk", json={"devices": devices})
            assert r.status_code == status, r.text
            assert named in r.json()["error"]
            assert snapshot(api.context) == before


def test_only_an_admin_enrolls_in_bulk(api: RunningApi) -> None:
    with api.client() as c:
        token = c.post("/v1/devices", json={"device_id": "cam-1"}).json()["token"]
    with api.client(token) as device:
        r = device.post("/v1/devices/bulk", json={"devices": [{"device_id": "cam-2"}]})
    assert r.status_code == 401
