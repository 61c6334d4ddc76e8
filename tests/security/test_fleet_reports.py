"""What a hostile device (or anyone able to publish on an unauthenticated broker) can make the
cloud's fleet service do: store a flood of keys, or broadcast an artifact it was never given.
Each probe goes through a real Mosquitto and checks the cloud's state afterwards."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.registry.tables import ModelVersion
from shared import topics
from shared.messages import ArtifactRequest, Telemetry
from shared.topics import DeviceTopic
from tests.cloud.fleet.desired_support import Watcher, add_models
from tests.fleet_harness import wait_for
from tests.ingest_support import Devices, cloud_context, started_fleet, stored_events
from tests.mosquitto import mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    with mosquitto(tmp_path / "broker") as port:
        yield port


@pytest.fixture
def context(tmp_path: Path, broker: int, embedded: ServiceUrls) -> Iterator[CloudContext]:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    ctx = cloud_context(tmp_path, url, f"mqtt://127.0.0.1:{broker}", embedded.redis_url)
    yield ctx
    ctx.close()


def _telemetry(**counts: int) -> str:
    return Telemetry.model_construct(
        schema_version=1, window_s=10.0, counts=counts, active={}, at=datetime.now(UTC)
    ).model_dump_json()


def test_a_telemetry_flood_of_keys_is_refused_and_the_next_window_stored(
    context: CloudContext, broker: int
) -> None:
    """A 60,000-key window (1.1 MB) and a small one with 300 keys are dropped (oversize,
    malformed) before they reach Redis; an oversized status is dropped too; the honest window
    after them is the one the live view shows."""
    devices = Devices(context, broker, 1)
    device_id = devices.ids[0]
    fleet = started_fleet(context)
    try:
        flood = _telemetry(**{f"k{i}": i for i in range(60_000)})
        devices.publish(device_id, DeviceTopic.TELEMETRY, flood)
        devices.publish(
            device_id, DeviceTopic.TELEMETRY, _telemetry(**{f"k{i}": 1 for i in range(300)})
        )
        status = json.loads(devices.status(device_id, 0))
        status["reason"] = "x" * 1999
        status["padding"] = "y" * 20_000  # unknown fields are ignored, but still weigh
        devices.publish(device_id, DeviceTopic.STATUS, json.dumps(status))
        devices.publish(device_id, DeviceTopic.TELEMETRY, _telemetry(requests=7))
        key = f"edgefleet:telemetry:{device_id}"
        wait_for(lambda: context.redis.get(key) is not None, 10, "the honest window")
        stored = json.loads(context.redis.get(key) or "{}")
        assert stored["counts"] == {"requests": 7}
        assert fleet.ingest.snapshot().dropped == {"oversize": 2, "malformed": 1}
        assert stored_events(context, device_id) == 0
    finally:
        fleet.stop(forget_session=True)
        devices.close()


def test_chunks_are_broadcast_only_for_the_asking_devices_desired_state(
    context: CloudContext, broker: int
) -> None:
    """Device A is told to run model m:1; device B nothing. B's request for A's artifact and
    A's request for a version it was not given are refused (nothing published); A's own
    request is answered. Once B is deployed the same version, its request is answered."""
    add_models(context, ("m",), versions=2)
    with context.database.session() as s:
        rows = s.scalars(select(ModelVersion).order_by(ModelVersion.version)).all()
        v1_sha, v2_sha = rows[0].artifact_sha256, rows[1].artifact_sha256
    devices = Devices(context, broker, 2)
    a, b = devices.ids
    watcher = Watcher(f"mqtt://127.0.0.1:{broker}")
    watcher.watch(f"{topics.PREFIX}artifacts/#")
    fleet = started_fleet(context)
    try:
        fleet.deploy(device_id=a, model="m", version=1)

        def ask(device_id: str, sha: str) -> None:
            request = ArtifactRequest(sha256=sha, chunks=[0])
            devices.publish(device_id, DeviceTopic.ARTIFACT_REQUEST, request.model_dump_json())

        ask(b, v1_sha)
        ask(a, v2_sha)
        wait_for(lambda: fleet.chunks.refused == 2, 10, "two refused requests")
        ask(a, v1_sha)
        wait_for(lambda: watcher.messages(topics.artifact_chunk(v1_sha, 0)), 10, "A's chunk")
        assert not watcher.messages(topics.artifact_chunk(v2_sha, 0))
        assert fleet.chunks.chunks_published == 1

        fleet.deploy(device_id=b, model="m", version=2)
        ask(b, v2_sha)
        wait_for(lambda: watcher.messages(topics.artifact_chunk(v2_sha, 0)), 10, "B's chunk")
        assert fleet.chunks.refused == 2
    finally:
        fleet.stop(forget_session=True)
        watcher.close()
        devices.close()


def test_a_request_on_a_topic_of_no_device_is_refused(context: CloudContext, broker: int) -> None:
    """A request published for a device that does not exist asks for nothing."""
    add_models(context, ("m",), versions=1)
    with context.database.session() as s:
        sha = s.scalars(select(ModelVersion.artifact_sha256)).one()
    devices = Devices(context, broker, 0)
    fleet = started_fleet(context)
    try:
        stranger = f"ghost-{uuid.uuid4().hex[:6]}"
        payload = ArtifactRequest(sha256=sha, chunks=[0]).model_dump_json()
        devices.publish(stranger, DeviceTopic.ARTIFACT_REQUEST, payload)
        wait_for(lambda: fleet.chunks.refused == 1, 10, "the refused request")
        assert fleet.chunks.requests == 0
    finally:
        fleet.stop(forget_session=True)
        devices.close()
