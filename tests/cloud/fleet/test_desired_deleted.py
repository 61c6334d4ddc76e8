"""A deleted device leaves nothing retained on the broker, and revs never go back below what a
device says it applied (a device enrolled again under its old id keeps its agent's state)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import select

from cloud.context import CloudContext
from cloud.fleet.desired import stored_state
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent, Device
from shared import topics
from shared.errors import Conflict
from shared.messages import Presence, PresenceState, ReportedState
from shared.signing import verify_desired_state
from shared.topics import DeviceTopic
from tests.cloud.fleet.desired_support import (
    Watcher,
    add_models,
    audit_of,
    enroll,
    flush_link,
    retained_desired,
)
from tests.conftest import RunningApi
from tests.fleet_harness import Cloud, running_cloud, wait_for

KINDS = (DeviceTopic.DESIRED, DeviceTopic.REPORTED, DeviceTopic.PRESENCE)


@pytest.fixture
def cloud(context: CloudContext) -> Iterator[Cloud]:
    add_models(context, ("alpha",))
    with running_cloud(context) as running:
        yield running
    with context.database.session() as s:
        device_ids = list(s.scalars(select(Device.id)))
    watcher = Watcher(context.urls.mqtt_url)
    try:
        for device_id in device_ids:
            for kind in KINDS:
                watcher.clear(topics.device_topic(device_id, kind))
    finally:
        watcher.close()


def _reported(rev_applied: int) -> bytes:
    return ReportedState(rev_applied=rev_applied, agent_version="test").model_dump_json().encode()


def test_a_deleted_device_enrolled_again_gets_no_old_document_and_a_rev_above_its_agents(
    cloud: Cloud,
) -> None:
    """cam is at rev 2 on the broker, its agent reports rev 2 applied. Deleting it empties
    its retained desired, reported and presence topics, so an agent of cam enrolled again
    receives no document of the old row. That agent (which still has rev 2 applied) reports
    it, and the first deploy to the new row is rev 3, which the agent accepts, not rev 1,
    which it would refuse as a rollback."""
    mqtt_url = cloud.context.urls.mqtt_url
    device_id, _ = cloud.enroll()
    watcher = Watcher(mqtt_url)
    try:
        watcher.watch(topics.device_filter(device_id))
        with cloud.admin() as c:
            first = c.put(f"/v1/devices/{device_id}/deployments/alpha", json={"version": 1})
            assert first.status_code == 202, first.text
            assert c.post(f"/v1/devices/{device_id}/desired/retry").json()["rev"] == 2
        watcher.put_retained(topics.device_topic(device_id, DeviceTopic.REPORTED), _reported(2))
        online = Presence(state=PresenceState.ONLINE).model_dump_json().encode()
        watcher.put_retained(topics.device_topic(device_id, DeviceTopic.PRESENCE), online)
        flush_link(cloud.fleet, mqtt_url)

        with cloud.admin() as c:
            assert c.delete(f"/v1/devices/{device_id}").status_code == 204
        for kind in KINDS:
            _wait_cleared(watcher, topics.device_topic(device_id, kind))

        enrolled = cloud.enroll(device_id)[1]
        # The agent connects with its new token and reports what it still runs (rev 2).
        watcher.put_retained(topics.device_topic(device_id, DeviceTopic.REPORTED), _reported(2))
        wait_for(lambda: _rev_applied(cloud.context, device_id) == 2, 10, "the report stored")
        with cloud.admin() as c:
            deployed = c.put(f"/v1/devices/{device_id}/deployments/alpha", json={"version": 2})
        assert deployed.status_code == 202, deployed.text
        assert deployed.json()["rev"] == 3
        flush_link(cloud.fleet, mqtt_url)
    finally:
        watcher.close()
    public_key = cloud.context.signing_key.public_key()
    document = retained_desired(mqtt_url, device_id)
    assert verify_desired_state(document, public_key, device_id=device_id).rev == 3
    assert enrolled["token"]


def _wait_cleared(watcher: Watcher, topic: str) -> None:
    wait_for(lambda: b"" in watcher.messages(topic), 10, f"{topic} cleared")


def _rev_applied(context: CloudContext, device_id: str) -> object:
    with context.database.session() as s:
        return repository.get_device(s, device_id=device_id).reported.get("rev_applied")


def test_devices_deleted_while_no_fleet_service_ran_are_cleared_when_one_connects(
    api: RunningApi,
) -> None:
    """An API without a fleet service in its process cannot publish. The deletion's audit
    record stays behind, and the fleet service clears the retained topics of every device
    deleted within a document's lifetime when it (re)connects: all three for a device that
    is gone, the desired topic (the old row's document) for one enrolled again since, and
    the kept device gets its document back."""
    context = api.context
    add_models(context, ("alpha",))
    gone, again, kept = enroll(context), enroll(context), enroll(context)
    sent: list[tuple[str, str]] = []
    keeper = DesiredStateKeeper(
        context, lambda topic, payload: sent.append((topic, payload)) is None
    )
    for device_id in (gone, again, kept):
        keeper.deploy(device_id=device_id, model="alpha", version=1)
    with api.client() as c:
        for device_id in (gone, again):
            assert c.delete(f"/v1/devices/{device_id}").status_code == 204
        assert c.post("/v1/devices", json={"device_id": again}).status_code == 201
    sent.clear()

    keeper.republish_all()  # what the fleet service's keeper does on each (re)connect

    assert {(topic, payload) for topic, payload in sent if payload == ""} == {
        *((topics.device_topic(gone, kind), "") for kind in KINDS),
        (topics.device_topic(again, DeviceTopic.DESIRED), ""),
    }
    with context.database.session() as s:
        document = repository.get_device(s, device_id=kept).desired_document
    assert (topics.device_topic(kept, DeviceTopic.DESIRED), document) in sent
    assert keeper.pending() == set()


def test_revs_start_above_what_the_device_reports_it_applied_or_queued(
    context: CloudContext,
) -> None:
    """The next rev is above the row's, the device's reported rev_applied and the revs of
    its status events (a rev it queued from an old document before applying it); a device
    reporting the largest rev there is gets a 409, and nothing is signed."""
    add_models(context, ("alpha",))
    device_id = enroll(context)
    keeper = DesiredStateKeeper(context, lambda _t, _p: True)
    with context.database.session() as s:
        device = repository.get_device(s, device_id=device_id)
        device.reported = ReportedState(rev_applied=7, agent_version="t").model_dump(mode="json")

    assert keeper.deploy(device_id=device_id, model="alpha", version=1).rev == 8

    with context.database.session() as s:
        s.add(
            DeploymentEvent(device_id=device_id, rev=12, state="DOWNLOADING", at=datetime.now(UTC))
        )
    assert keeper.retry(device_id=device_id, actor="admin").state.rev == 13

    with context.database.session() as s:
        repository.get_device(s, device_id=device_id).reported = {"rev_applied": 2**31 - 1}
    with pytest.raises(Conflict, match="no higher rev"):
        keeper.deploy(device_id=device_id, model="alpha", version=2)
    with context.database.session() as s:
        state = stored_state(repository.get_device(s, device_id=device_id))
    assert state is not None
    assert state.rev == 13
    assert [e["rev"] for e in audit_of(context, device_id, "desired.sign")] == [8, 13]
