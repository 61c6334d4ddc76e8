"""The chunk broadcaster: an error while answering is logged and the broadcast goes on."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from cloud.artifacts.store import ArtifactStore
from cloud.fleet.chunks import ChunkBroadcaster
from shared import topics
from shared.messages import ArtifactRequest
from tests.fleet_harness import wait_for


def test_a_failed_publish_is_logged_and_the_broadcaster_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first publish raises (a broker client bug, a payload refused): the error is logged
    and counted, the other artifact of that window is still served, and a later request for
    the first artifact is answered (today's loop died on the first error, silently)."""
    store = ArtifactStore(tmp_path / "artifacts", chunk_size=1024)
    first = store.put_bytes(b"a" * 3000)
    second = store.put_bytes(b"b" * 1500)
    published: list[str] = []
    lock = threading.Lock()

    def publish(topic: str, _data: bytes) -> bool:
        with lock:
            if not published and topics.parse(topic).sha256 == first.sha256:
                published.append("raised")
                raise RuntimeError("payload refused")
            published.append(topic)
        return True

    broadcaster = ChunkBroadcaster(store, publish, chunk_size_of=lambda _sha: 1024, window_s=0.05)
    broadcaster.start()
    try:
        with caplog.at_level(logging.ERROR, "cloud.fleet.chunks"):
            broadcaster.request(ArtifactRequest(sha256=first.sha256, chunks=[0, 1]))
            broadcaster.request(ArtifactRequest(sha256=second.sha256, chunks=[0, 1]))
            wait_for(lambda: broadcaster.chunks_published == 2, 10, "the second artifact")
            assert broadcaster.errors == 1
            assert "chunk broadcast of" in caplog.text
        broadcaster.request(ArtifactRequest(sha256=first.sha256, chunks=[2]))
        wait_for(lambda: broadcaster.chunks_published == 3, 10, "the later request")
    finally:
        broadcaster.stop()
    assert published[-1] == topics.artifact_chunk(first.sha256, 2)


def test_a_chunk_size_lookup_that_fails_does_not_end_the_broadcast(tmp_path: Path) -> None:
    """The database behind the chunk-size lookup fails once, while the window is answered
    (it is down for a moment): that window is lost and logged, the next one is served."""
    store = ArtifactStore(tmp_path / "artifacts", chunk_size=1024)
    artifact = store.put_bytes(b"c" * 2048)
    calls: list[str] = []

    def chunk_size_of(sha256: str) -> int:
        calls.append(sha256)
        if len(calls) == 2:  # the first lookup admits the request, the second answers it
            raise ConnectionError("database down")
        return 1024

    broadcaster = ChunkBroadcaster(
        store, lambda _t, _d: True, chunk_size_of=chunk_size_of, window_s=0.01
    )
    broadcaster.start()
    try:
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[0]))
        wait_for(lambda: broadcaster.errors == 1, 10, "the logged error")
        broadcaster.request(ArtifactRequest(sha256=artifact.sha256, chunks=[1]))
        wait_for(lambda: broadcaster.chunks_published == 1, 10, "the next window")
    finally:
        broadcaster.stop()
