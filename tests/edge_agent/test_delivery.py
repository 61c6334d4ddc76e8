"""Delivery: an artifact reaches the ModelStore over HTTP Range (an httpx.MockTransport
playing the cloud's artifact endpoint) or as MQTT chunks (a real Mosquitto, with a client
playing the cloud's chunk broadcaster); both resume from what is on disk and keep no chunk
that fails its hash."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest

from edge_agent.delivery import HttpDelivery, MqttDelivery
from edge_agent.model_store import ModelStore
from shared import topics
from shared.errors import IntegrityError, ServiceUnavailable
from shared.messages import ArtifactRef, ArtifactRequest, decode
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from shared.topics import DeviceTopic
from tests.edge_agent.support import CHUNK, wait_for
from tests.services import MOSQUITTO, need

DATA = os.urandom(CHUNK * 5 + 300)
REF = ArtifactRef.of(DATA, CHUNK)
TOKEN = "device-token-123"


class ArtifactEndpoint:
    """`GET /v1/artifacts/{sha256}` with Range, as the cloud serves it."""

    def __init__(self, data: bytes = DATA, *, honour_range: bool = True) -> None:
        self.data = data
        self.honour_range = honour_range
        self.ranges: list[str | None] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json={"error": "unauthorized"})
        if request.url.path != f"/v1/artifacts/{REF.sha256}":
            return httpx.Response(404, json={"error": "no such artifact"})
        wanted = request.headers.get("Range")
        self.ranges.append(wanted)
        if wanted is None or not self.honour_range:
            return httpx.Response(200, content=self.data)
        start = int(wanted.removeprefix("bytes=").removesuffix("-"))
        return httpx.Response(
            206,
            content=self.data[start:],
            headers={"Content-Range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"},
        )


def _http(store: ModelStore, endpoint: ArtifactEndpoint) -> HttpDelivery:
    return HttpDelivery(
        store,
        cloud_url="http://cloud.test/",
        token=TOKEN,
        transport=httpx.MockTransport(endpoint.handle),
    )


def _fill(store: ModelStore, indices: list[int]) -> None:
    for i in indices:
        assert store.write_chunk(REF, i, DATA[i * CHUNK : (i + 1) * CHUNK])


def test_http_fetches_the_whole_artifact_and_reports_progress(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    endpoint = ArtifactEndpoint()
    progress: list[int] = []
    delivery = _http(store, endpoint)
    delivery.fetch(REF, progress.append, threading.Event())
    delivery.close()
    assert endpoint.ranges == ["bytes=0-"]
    assert progress == sorted(progress)
    assert progress[-1] == len(DATA)
    assert store.finish(REF).read_bytes() == DATA


def test_http_resumes_from_the_first_missing_chunk(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _fill(store, [0, 1, 3])
    endpoint = ArtifactEndpoint()
    _http(store, endpoint).fetch(REF, lambda _done: None, threading.Event())
    assert endpoint.ranges == [f"bytes={2 * CHUNK}-"]
    assert store.missing_chunks(REF) == []
    assert store.finish(REF).read_bytes() == DATA


def test_http_takes_a_whole_file_from_a_server_that_ignores_range(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _fill(store, [0, 1])
    _http(store, ArtifactEndpoint(honour_range=False)).fetch(
        REF, lambda _done: None, threading.Event()
    )
    assert store.finish(REF).read_bytes() == DATA


def test_http_keeps_the_good_chunks_before_a_corrupted_one(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    tampered = bytearray(DATA)
    tampered[3 * CHUNK + 10] ^= 0xFF
    with pytest.raises(IntegrityError, match="chunk 3 from HTTP failed its hash"):
        _http(store, ArtifactEndpoint(bytes(tampered))).fetch(
            REF, lambda _done: None, threading.Event()
        )
    assert store.missing_chunks(REF) == [3, 4, 5]


@pytest.mark.parametrize(
    ("transport", "message"),
    [
        (httpx.MockTransport(lambda r: httpx.Response(404)), "answered 404"),
        (
            httpx.MockTransport(lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused"))),
            "artifact download failed: refused",
        ),
    ],
    ids=["404", "refused"],
)
def test_http_errors_are_service_unavailable(
    tmp_path: Path, transport: httpx.BaseTransport, message: str
) -> None:
    store = ModelStore(tmp_path)
    delivery = HttpDelivery(store, cloud_url="http://cloud.test", token=TOKEN, transport=transport)
    with pytest.raises(ServiceUnavailable, match=message):
        delivery.fetch(REF, lambda _done: None, threading.Event())


def test_http_stops_when_asked(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    stop = threading.Event()
    stop.set()
    _http(store, ArtifactEndpoint()).fetch(REF, lambda _done: None, stop)
    assert len(store.missing_chunks(REF)) == len(REF.chunks)


# -- MQTT ------------------------------------------------------------------------------


class ChunkBroadcaster:
    """Answers each artifact request with the chunks asked for, as the fleet service does;
    it can corrupt the first copy of one chunk."""

    def __init__(
        self,
        device_id: str,
        *,
        corrupt: int | None = None,
        lose: int | None = None,
        pace_s: float = 0.0,
    ) -> None:
        self.device_id = device_id
        self.pace_s = pace_s  # between chunks: a carousel that keeps delivering, slowly
        self.corrupt = corrupt
        self.lose = lose  # a chunk the first answer leaves out, as if lost on the way
        self.requests: list[list[int]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:8]}"
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        client.subscribe(topics.device_topic(self.device_id, DeviceTopic.ARTIFACT_REQUEST), 1)

    def _on_message(self, client: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        request = decode(ArtifactRequest, message.payload)
        self.requests.append(request.chunks)
        if self.pace_s:  # off paho's thread, which sends nothing while a callback runs
            threading.Thread(target=self._answer, args=(client, request), daemon=True).start()
        else:
            self._answer(client, request)

    def _answer(self, client: mqtt.Client, request: ArtifactRequest) -> None:
        for index in request.chunks:
            if index == self.lose:
                self.lose = None
                continue
            chunk = DATA[index * CHUNK : (index + 1) * CHUNK]
            if index == self.corrupt:
                self.corrupt = None
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            client.publish(topics.artifact_chunk(request.sha256, index), chunk, qos=1)
            time.sleep(self.pace_s)

    def start(self) -> None:
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def stop(self) -> None:
        self.client.disconnect()  # first: it wakes the network loop, which then ends at once
        self.client.loop_stop()


@pytest.fixture
def link() -> Iterator[MqttLink]:
    need(MOSQUITTO)
    link = MqttLink("mqtt://127.0.0.1:1883", client_id=f"unit-{uuid.uuid4().hex[:8]}")
    link.start()
    assert link.wait_connected(10)
    yield link
    link.stop()


def _device() -> str:
    return f"unit-{uuid.uuid4().hex[:8]}"


def test_mqtt_asks_for_the_missing_chunks_and_assembles_the_artifact(
    tmp_path: Path, link: MqttLink
) -> None:
    device = _device()
    store = ModelStore(tmp_path)
    _fill(store, [1, 4])
    cloud = ChunkBroadcaster(device)
    cloud.start()
    progress: list[int] = []
    try:
        delivery = MqttDelivery(link, store, device_id=device, wait_s=2.0)
        delivery.fetch(REF, progress.append, threading.Event())
    finally:
        cloud.stop()
    assert cloud.requests[0] == [0, 2, 3, 5]
    assert progress[-1] == len(DATA)
    assert store.finish(REF).read_bytes() == DATA


def test_mqtt_says_how_far_it_is_while_the_chunks_keep_coming(
    tmp_path: Path, link: MqttLink
) -> None:
    """A carousel that never goes quiet never ends the wait before the last chunk; the
    download still says its progress along the way, not only 0 and then all of it (an
    operator watching a slow rollout saw nothing move)."""
    device = _device()
    store = ModelStore(tmp_path)
    cloud = ChunkBroadcaster(device, pace_s=0.4)
    cloud.start()
    progress: list[int] = []
    try:
        delivery = MqttDelivery(link, store, device_id=device, wait_s=5.0)
        delivery.fetch(REF, progress.append, threading.Event())
    finally:
        cloud.stop()
    assert cloud.requests == [list(range(len(REF.chunks)))]  # one ask: the wait never ended
    assert [done for done in progress if 0 < done < len(DATA)], progress
    assert progress == sorted(progress)
    assert progress[-1] == len(DATA)


def test_mqtt_asks_again_for_a_chunk_that_failed_its_hash(tmp_path: Path, link: MqttLink) -> None:
    device = _device()
    store = ModelStore(tmp_path)
    cloud = ChunkBroadcaster(device, corrupt=2)
    cloud.start()
    try:
        delivery = MqttDelivery(
            link, store, device_id=device, wait_s=0.5, backoff=Backoff(base=0.01, cap=0.05)
        )
        delivery.fetch(REF, lambda _done: None, threading.Event())
    finally:
        cloud.stop()
    assert delivery.rejected_chunks == 1
    assert [2] in cloud.requests[1:]
    assert store.finish(REF).read_bytes() == DATA


def test_mqtt_gives_up_with_a_reason_when_nobody_answers(tmp_path: Path, link: MqttLink) -> None:
    """Three asks without a chunk, and no sooner than give_up_s after the first."""
    delivery = MqttDelivery(
        link,
        ModelStore(tmp_path),
        device_id=_device(),
        wait_s=0.05,
        max_stalls=3,
        give_up_s=0.5,
        backoff=Backoff(base=0.01, cap=0.02),
    )
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="download stalled: 6 of 6 chunks missing"):
        delivery.fetch(REF, lambda _done: None, threading.Event())
    assert time.monotonic() - began >= 0.5
    assert delivery.requests > 3


def test_mqtt_returns_when_stopped(tmp_path: Path, link: MqttLink) -> None:
    store = ModelStore(tmp_path)
    delivery = MqttDelivery(link, store, device_id=_device(), wait_s=5.0)
    stop = threading.Event()
    fetching = threading.Thread(target=delivery.fetch, args=(REF, lambda _d: None, stop))
    fetching.start()
    wait_for(lambda: delivery._active, 5, "the fetch to subscribe")
    stop.set()
    fetching.join(5)
    assert not fetching.is_alive()
    assert len(store.missing_chunks(REF)) == len(REF.chunks)


def test_mqtt_asks_again_soon_for_a_chunk_a_later_one_shows_was_lost(
    tmp_path: Path, link: MqttLink
) -> None:
    """Chunk 2 never comes while 3, 4, 5 do, and chunk 0 keeps coming for other devices (so
    the line is never quiet, and the device would wait its whole patience): a later chunk
    shows 2 was lost, and the device asks for it again shortly after."""
    device = _device()
    store = ModelStore(tmp_path)
    cloud = ChunkBroadcaster(device, lose=2)
    cloud.start()
    others = threading.Event()

    def other_devices_pass() -> None:
        while not others.wait(0.2):
            cloud.client.publish(topics.artifact_chunk(REF.sha256, 0), DATA[:CHUNK], qos=1)

    noise = threading.Thread(target=other_devices_pass, daemon=True)
    noise.start()
    delivery = MqttDelivery(
        link, store, device_id=device, wait_s=60.0, patience=100.0, skip_delay_s=0.3
    )
    fetching = threading.Thread(
        target=delivery.fetch, args=(REF, lambda _d: None, threading.Event()), daemon=True
    )
    try:
        fetching.start()
        fetching.join(20)
        assert not fetching.is_alive(), f"still waiting; asked {cloud.requests}"
    finally:
        others.set()
        noise.join(5)
        cloud.stop()
    assert cloud.requests[1] == [2]
    assert store.finish(REF).read_bytes() == DATA


class PassUnderWay:
    """The cloud's carousel as a device joining mid-pass meets it: the pass it joins is at
    chunk ``JOIN`` and sends the rest, one chunk every 0.1 s; the next pass sends the chunks
    below, and the device is done. Every request message is kept."""

    JOIN = 20

    def __init__(self, device_id: str, data: bytes) -> None:
        self.data = data
        self.ref = ArtifactRef.of(data, CHUNK)
        self.requests: list[ArtifactRequest] = []
        self.first_ask_in = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"cloud-{uuid.uuid4().hex[:8]}"
        )
        topic = topics.device_topic(device_id, DeviceTopic.ARTIFACT_REQUEST)
        self.client.on_connect = lambda client, *_a: client.subscribe(topic, 1)
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.passes = threading.Thread(target=self._passes, daemon=True)
        self.stop = threading.Event()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.requests.append(decode(ArtifactRequest, message.payload))
        if sum(len(r.chunks) for r in self.requests) >= len(self.ref.chunks):
            self.first_ask_in.set()

    def _send(self, indices: range, pause: float) -> None:
        for index in indices:
            if self.stop.wait(pause):
                return
            chunk = self.data[index * CHUNK : (index + 1) * CHUNK]
            self.client.publish(topics.artifact_chunk(self.ref.sha256, index), chunk, qos=1)

    def _passes(self) -> None:
        if self.first_ask_in.wait(10):
            self._send(range(self.JOIN, len(self.ref.chunks)), 0.1)
            self._send(range(self.JOIN), 0.02)

    def start(self) -> None:
        self.client.connect("127.0.0.1", 1883)
        self.client.loop_start()
        # Before the device's first ask: an ask the broker delivered to nobody left this
        # carousel idle and the device waiting out its 60 s patience (seen under load).
        assert self.subscribed.wait(10)
        self.passes.start()

    def close(self) -> None:
        self.stop.set()
        self.passes.join(10)
        self.client.disconnect()
        self.client.loop_stop()


def test_a_device_joining_mid_pass_asks_for_the_gap_once_not_for_everything_again(
    tmp_path: Path, link: MqttLink
) -> None:
    """The device asks for its 40 chunks in three messages (only the first says it joins);
    the pass it joined sends 20..39 over 2 s, each arrival above the missing 0..19: it asks
    once for 0..19 — not its whole missing list every skip_delay_s, as it did before."""
    device = _device()
    data = os.urandom(CHUNK * 40)
    cloud = PassUnderWay(device, data)
    cloud.start()
    delivery = MqttDelivery(
        link, ModelStore(tmp_path), device_id=device, request_window=16,
        wait_s=60.0, patience=100.0, skip_delay_s=0.3,
    )  # fmt: skip
    try:
        delivery.fetch(cloud.ref, lambda _d: None, threading.Event())
    finally:
        cloud.close()
    first, again = cloud.requests[:3], cloud.requests[3:]
    assert [r.first for r in first] == [True, False, False]
    assert sorted(i for r in first for i in r.chunks) == list(range(40))
    assert sorted(i for r in again for i in r.chunks) == list(range(20))
    assert not any(r.first for r in again)
    # A first ask says nothing of why; the gap's, that later chunks showed it was lost.
    assert [r.passed_over for r in first] == [None] * 3
    assert [r.passed_over for r in again] == [True] * len(again)
    assert delivery.store.finish(cloud.ref).read_bytes() == data


def test_an_ask_made_of_silence_says_so_until_the_chunks_are_presumed_lost(
    tmp_path: Path, link: MqttLink
) -> None:
    """Nothing arrives: the device asks again after its quiet time, and says the ask comes of
    silence (passed_over False), so the cloud does not send the whole pass again to a device
    whose chunks may be queued for it at the broker; presume_lost_s after the last gain it
    says they were lost (a lost last chunk shows no gap, and the cloud would wait on)."""
    device = _device()
    asks: list[ArtifactRequest] = []
    recorder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{device}")
    subscribed = threading.Event()
    recorder.on_subscribe = lambda *_a: subscribed.set()
    recorder.on_message = lambda _c, _u, m: asks.append(decode(ArtifactRequest, m.payload))
    recorder.connect("127.0.0.1", 1883)
    recorder.loop_start()
    recorder.subscribe(topics.device_topic(device, DeviceTopic.ARTIFACT_REQUEST), 1)
    assert subscribed.wait(10)
    delivery = MqttDelivery(
        link, ModelStore(tmp_path), device_id=device, wait_s=0.1, max_stalls=2, give_up_s=1.0,
        presume_lost_s=0.5, backoff=Backoff(base=0.01, cap=0.02),
    )  # fmt: skip
    try:
        with pytest.raises(ServiceUnavailable):
            delivery.fetch(REF, lambda _done: None, threading.Event())
        wait_for(lambda: len(asks) >= 3, 10, "the asks")
    finally:
        recorder.disconnect()
        recorder.loop_stop()
    assert (asks[0].first, asks[0].passed_over) == (True, None)
    assert not any(a.first for a in asks[1:])
    said = [a.passed_over for a in asks[1:]]
    assert said[0] is False
    assert said[-1] is True
    assert said == sorted(said)  # silence first, then lost: never back
