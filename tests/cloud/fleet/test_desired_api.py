"""The desired-state API on a real uvicorn and fleet service: read it, retry a failed rev."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloud.context import CloudContext
from shared.signing import load_public_key, verify_desired_state
from tests.cloud.fleet.desired_support import (
    add_models,
    audit_of,
    clear_desired,
    flush_link,
    retained_desired,
)
from tests.fleet_harness import Cloud, running_cloud


@pytest.fixture
def cloud(context: CloudContext) -> Iterator[Cloud]:
    add_models(context, ("alpha",))
    with running_cloud(context) as running:
        yield running
    clear_desired(context)


def test_an_operator_reads_the_desired_state_and_retries_it_under_a_new_rev(cloud: Cloud) -> None:
    """A device ignores a rev it already took, even one that FAILED: the retry re-signs the
    same models under the next rev, publishes it, and the audit says who asked."""
    device_id, enrolled = cloud.enroll()
    with cloud.admin() as c:
        deployed = c.put(f"/v1/devices/{device_id}/deployments/alpha", json={"version": 2})
        assert deployed.status_code == 202, deployed.text
        current = c.get(f"/v1/devices/{device_id}/desired")
        retried = c.post(f"/v1/devices/{device_id}/desired/retry")
        after = c.get(f"/v1/devices/{device_id}/desired").json()

    assert current.status_code == 200
    first = current.json()
    assert first["rev"] == 1
    assert first["deployments"] == [{"model": "alpha", "version": 2, "rollout_id": None}]
    assert first["expires_at"] > first["issued_at"]
    assert retried.status_code == 202, retried.text
    assert retried.json()["rev"] == 2
    assert retried.json()["deployments"] == first["deployments"]
    answer = retried.json()
    assert (answer.pop("published"), answer.pop("note")) == (True, None)
    assert after == answer

    flush_link(cloud.fleet, cloud.context.urls.mqtt_url)
    document = retained_desired(cloud.context.urls.mqtt_url, device_id)
    state = verify_desired_state(
        document, load_public_key(enrolled["public_key"]), device_id=device_id
    )
    assert state.rev == 2
    assert [e["rev"] for e in audit_of(cloud.context, device_id, "desired.sign")] == [1, 2]
    assert audit_of(cloud.context, device_id, "desired.retry") == [
        {"rev": 2, "previous_rev": 1, "actor": "admin"}
    ]


def test_retry_and_read_say_what_is_missing(cloud: Cloud) -> None:
    """Unknown device: 404. A device never given a desired state: 404 to read, 409 to retry
    (nothing to retry), and nothing is signed."""
    device_id, _ = cloud.enroll()
    with cloud.admin() as c:
        unknown_read = c.get("/v1/devices/ghost/desired")
        unknown_retry = c.post("/v1/devices/ghost/desired/retry")
        empty_read = c.get(f"/v1/devices/{device_id}/desired")
        empty_retry = c.post(f"/v1/devices/{device_id}/desired/retry")
        unauthenticated = c.post(
            f"/v1/devices/{device_id}/desired/retry", headers={"Authorization": "Bearer nope"}
        )
    assert (unknown_read.status_code, unknown_retry.status_code) == (404, 404)
    assert empty_read.status_code == 404
    assert "no desired state" in empty_read.json()["error"]
    assert empty_retry.status_code == 409
    assert "no desired state" in empty_retry.json()["error"]
    assert unauthenticated.status_code == 401
    assert audit_of(cloud.context, device_id, "desired.sign") == []
