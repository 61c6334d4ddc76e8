"""The cloud's carousel may hold a pass back while a wave's devices join (at most the longest
``chunk_pass_max_wait_s`` its settings allow); a device that asked meanwhile and hears
nothing must not give its download up before the pass comes — whatever its ``chunk_wait_s``
(the fleet harness and the simulator use 1 s) and however its jitter falls."""

from __future__ import annotations

import os
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from annotated_types import Le

from cloud.artifacts.store import ArtifactStore
from cloud.fleet.carousel import Pacing
from cloud.fleet.chunks import ChunkBroadcaster
from cloud.settings import CloudSettings
from edge_agent.config import AgentSettings
from edge_agent.delivery import MqttDelivery
from edge_agent.model_store import ModelStore
from shared import topics
from shared.messages import ArtifactRef, ArtifactRequest, decode
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from shared.topics import DeviceTopic
from tests.services import MOSQUITTO, need

CHUNK = 1024
URL = "mqtt://127.0.0.1:1883"


class Unlucky(random.Random):
    """Every jittered draw at its lowest: the device that asks again soonest, and so would
    count its requests without progress up fastest."""

    def uniform(self, a: float, b: float) -> float:
        return a


def _longest_pass_wait() -> float:
    field = CloudSettings.model_fields["chunk_pass_max_wait_s"]
    return float(next(m.le for m in field.metadata if isinstance(m, Le)))  # type: ignore[arg-type]


@pytest.fixture
def links() -> Iterator[list[MqttLink]]:
    need(MOSQUITTO)
    opened: list[MqttLink] = []
    yield opened
    for link in opened:
        link.stop()


def _link(links: list[MqttLink], **options: object) -> MqttLink:
    link = MqttLink(URL, client_id=f"unit-{uuid.uuid4().hex[:8]}", **options)  # type: ignore[arg-type]
    links.append(link)
    link.start()
    assert link.wait_connected(10)
    return link


def test_a_device_waits_out_the_longest_pass_the_cloud_may_hold_back(
    tmp_path: Path, links: list[MqttLink]
) -> None:
    """The carousel starts its pass only after the longest wait the cloud's settings allow;
    the device (chunk_wait_s 1 s, the agent's default stall limit and patience, every draw
    unlucky) asks and hears nothing all that time, yet keeps waiting, and gets the artifact
    from that pass. Before, it gave up ("download stalled") after 8 quiet seconds."""
    hold = _longest_pass_wait()
    data = os.urandom(CHUNK * 6 + 100)
    store = ArtifactStore(tmp_path / "cloud", chunk_size=CHUNK)
    artifact = store.put_bytes(data)
    device = f"unit-{uuid.uuid4().hex[:8]}"
    cloud = _link(links, on_published=lambda: broadcaster.acked())
    broadcaster = ChunkBroadcaster(
        store,
        lambda topic, payload: cloud.publish(topic, payload, qos=1),
        chunk_size_of=lambda _sha: CHUNK,
        in_flight=lambda: cloud.in_flight,
        pacing=Pacing(settle_s=hold, lone_settle_s=hold, max_wait_s=hold),
    )
    cloud.subscribe(
        topics.device_topic(device, DeviceTopic.ARTIFACT_REQUEST),
        lambda _t, payload: broadcaster.request(decode(ArtifactRequest, payload), device),
    )
    broadcaster.start()
    agent = AgentSettings.model_fields
    delivery = MqttDelivery(
        _link(links),
        ModelStore(tmp_path / "device"),
        device_id=device,
        wait_s=1.0,
        max_stalls=agent["download_max_stalls"].default,
        give_up_s=agent["download_give_up_s"].default,
        rng=Unlucky(),
        backoff=Backoff(base=0.2, cap=10.0, rng=Unlucky()),
    )
    ref = ArtifactRef.of(data, CHUNK)
    assert ref.sha256 == artifact.sha256
    try:
        delivery.fetch(ref, lambda _done: None, threading.Event())
    finally:
        broadcaster.stop()
    assert broadcaster.passes == 1
    assert delivery.store.finish(ref).read_bytes() == data
