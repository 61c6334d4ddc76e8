"""POST /v1/rollouts with the undeploy form: which devices it targets, and bad requests that
get a clear 4xx and change nothing; the request shape of a version rollout keeps working."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from cloud.registry import repository
from cloud.registry.tables import Device, Rollout
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import RunningApi
from tests.onnx_models import tiny_classifier


@pytest.fixture
def fleet(api: RunningApi) -> RunningApi:
    """Model m v1; cam-1 (site=lab) should run it, cam-2 (site=lab) and cam-3 (site=far)
    do not."""
    with api.client() as c:
        assert c.post("/v1/models", json={"name": "m"}).status_code == 201
        assert upload(c, "m", tiny_classifier(seed=1)).status_code == 201
        for device, site in (("cam-1", "lab"), ("cam-2", "lab"), ("cam-3", "far")):
            body = {"device_id": device, "labels": {"site": site}}
            assert c.post("/v1/devices", json=body).status_code == 201
    with api.context.database.session() as s:
        row = repository.get_version(s, model_name="m", version=1)
        device = s.get(Device, "cam-1")
        assert device is not None
        device.desired = {"m": {"version_id": row.id, "rollout_id": None}}
    return api


def _rollouts(api: RunningApi) -> int:
    with api.context.database.session() as s:
        return s.scalar(select(func.count()).select_from(Rollout)) or 0


def test_an_undeploy_targets_only_the_devices_that_run_the_model(fleet: RunningApi) -> None:
    with fleet.client() as c:
        r = c.post("/v1/rollouts", json={"model": "m", "undeploy": True,
                                         "selector": {"site": "lab"}})  # fmt: skip
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["undeploy"], body["version"], body["devices"]) == (True, None, 1)
        targets = c.get(f"/v1/rollouts/{body['id']}/targets").json()["items"]
        assert [(t["device_id"], t["state"]) for t in targets] == [("cam-1", "PENDING")]
        listed = c.get("/v1/rollouts", params={"model": "m"}).json()
        assert [(x["id"], x["undeploy"]) for x in listed] == [(body["id"], True)]
        # The request shape from before undeploys: a version rollout, which supersedes it.
        r = c.post("/v1/rollouts", json={"model": "m", "version": 1})
        assert r.status_code == 201, r.text
        assert (r.json()["undeploy"], r.json()["version"], r.json()["devices"]) == (False, 1, 3)
        assert c.get(f"/v1/rollouts/{body['id']}").json()["state"] == "SUPERSEDED"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        ({"model": "m", "version": 1, "undeploy": True}, 422, "an undeploy takes no version"),
        ({"model": "m"}, 422, "give the version to roll out (or undeploy: true)"),
        ({"model": "m", "undeploy": "soon"}, 422, "undeploy: Input should be a valid boolean"),
        ({"model": "nope", "undeploy": True}, 404, "unknown model 'nope'"),
        ({"model": "m", "undeploy": True, "selector": {"site": "moon"}}, 400,
         "no enrolled device has the labels {'site': 'moon'}"),
        ({"model": "m", "undeploy": True, "selector": {"site": "far"}}, 400,
         "no device with the labels {'site': 'far'} runs 'm'"),
    ],
    ids=["version-and-undeploy", "neither", "not-a-bool", "unknown-model", "no-device",
         "nobody-runs-it"],
)  # fmt: skip
def test_a_bad_undeploy_is_refused_and_changes_nothing(
    fleet: RunningApi, body: dict[str, Any], status: int, error: str
) -> None:
    before = snapshot(fleet.context)
    with fleet.client() as c:
        r = c.post("/v1/rollouts", json=body)
    assert r.status_code == status, r.text
    assert error in r.json()["error"]
    assert snapshot(fleet.context) == before
    assert _rollouts(fleet) == 0
