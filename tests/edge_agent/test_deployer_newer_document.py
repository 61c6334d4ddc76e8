"""Deployer and a newer document: a download it no longer wants stops there (the superseded
version never becomes ACTIVE), one it still wants goes on, and a model it no longer names is
unloaded, taken off the store and reported REMOVED."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edge_agent.model_store import ModelStore
from shared.errors import NotFound
from shared.messages import ArtifactRef, Manifest
from tests.edge_agent.support import CHUNK, golden_for, manifest_for, tiny_classifier, wait_for
from tests.edge_agent.test_deployer import (
    ROW,
    ChunkFetcher,
    Rig,
    _rig,
    _serving,
    _v1,
    _version,
)


class LateLastChunk(ChunkFetcher):
    """Every chunk but the last arrives at once; the last one only once the test releases it
    (a slow delivery, caught mid-way). Stopped first, it returns without it, as a real
    delivery does."""

    def __init__(self, store: ModelStore, blobs: dict[str, bytes]) -> None:
        super().__init__(store)
        self.blobs = blobs
        self.release = threading.Event()
        self.stopped = threading.Event()

    def fetch(
        self, ref: ArtifactRef, progress: Callable[[int], None], stop: threading.Event
    ) -> None:
        data = self.blobs[ref.sha256]
        missing = self.store.missing_chunks(ref)
        for index in missing[:-1]:
            assert self.store.write_chunk(ref, index, data[index * CHUNK : (index + 1) * CHUNK])
        progress(self.store.bytes_done(ref))
        self.started.set()
        while not stop.is_set() and not self.release.is_set():
            stop.wait(0.05)
        if stop.is_set():
            self.stopped.set()
            return
        last = missing[-1]
        assert self.store.write_chunk(ref, last, data[last * CHUNK : (last + 1) * CHUNK])
        progress(self.store.bytes_done(ref))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    running = _rig(tmp_path)
    yield running
    running.deployer.stop()


def _other(rig: Rig) -> Manifest:
    """A second model ('other') the fetcher can deliver."""
    data = tiny_classifier(seed=9)
    rig.fetcher.offer(data)
    return manifest_for(data, model="other", golden=[golden_for(data, {"input": ROW})])


def _slow(rig: Rig) -> LateLastChunk:
    fetcher = LateLastChunk(rig.store, rig.fetcher.blobs)
    rig.fetcher = rig.deployer.fetcher = fetcher  # type: ignore[assignment]
    return fetcher


def test_a_download_the_newer_document_does_not_want_stops_and_never_activates(
    rig: Rig,
) -> None:
    """v1 serves; rev 2 (v2) is mid-download when rev 3 (v3) arrives: the v2 download stops
    without waiting for its last chunk, v2 is FAILED 'superseded by rev 3' and never ACTIVE,
    v3 goes ACTIVE, and the abandoned partial download is deleted."""
    _v1(rig)
    v2, v3 = _version(rig, 2, seed=2), _version(rig, 3, seed=3)
    slow = _slow(rig)
    rig.send(2, v2)
    assert slow.started.wait(10)
    rig.send(3, v3)
    assert slow.stopped.wait(10), "the v2 download went on after rev 3 arrived"
    slow.release.set()  # v3's own download is not held
    wait_for(rig.deployer.idle, 20, "rev 3 handled")

    assert "ACTIVE" not in rig.states(2)
    assert rig.states(2)[-2:] == ["FAILED", "ROLLED_BACK"]
    assert rig.last(2, "FAILED").reason == (
        "DOWNLOADING: superseded by rev 3 before it was activated"
    )
    assert rig.last(3, "ACTIVE").rev == 3
    _serving(rig, 3)
    assert list(rig.store.partial.iterdir()) == []
    assert rig.store.state.rev_applied == 3


def test_a_download_the_newer_document_still_wants_goes_on(rig: Rig) -> None:
    """Rev 3 names the same v2 (and a second model): the v2 download is not abandoned; v2
    goes ACTIVE under rev 2, then rev 3 relabels it and adds the other model."""
    _v1(rig)
    v2 = _version(rig, 2, seed=2)
    other = _other(rig)
    slow = _slow(rig)
    rig.send(2, v2)
    assert slow.started.wait(10)
    rig.send(3, v2, other)
    assert not slow.stopped.wait(0.5)
    slow.release.set()
    wait_for(rig.deployer.idle, 20, "rev 3 handled")

    assert rig.states(2)[-1] == "ACTIVE"
    assert "FAILED" not in rig.states(2)
    assert {e.rev for e in rig.events if e.state.value == "ACTIVE" and e.version == 2} == {2, 3}
    assert set(rig.runtime.models()) == {"m", "other"}


def test_a_model_the_document_no_longer_names_is_removed(rig: Rig) -> None:
    """Rev 2 names only 'other': 'm' is unloaded (a request for it is a NotFound, the 404 of
    the local API), gone from the store's active and previous sets across a restart, its
    blobs deleted, and REMOVED is reported with the version it ran."""
    _v1(rig)
    rig.deploy(2, _version(rig, 2, seed=2))  # so 'm' has a previous version too
    blobs_of_m = {p.name for p in rig.store.blobs.iterdir()}
    assert len(blobs_of_m) == 2
    other = _other(rig)
    rig.deploy(3, other)

    removed = [e for e in rig.events if e.state.value == "REMOVED"]
    assert [(e.rev, e.model, e.version) for e in removed] == [(3, "m", 2)]
    with pytest.raises(NotFound, match="no model 'm' is active on this device"):
        rig.runtime.get("m")
    assert rig.store.active("m") is None
    assert not blobs_of_m & {p.name for p in rig.store.blobs.iterdir()}
    reopened = ModelStore(rig.store.root)
    assert set(reopened.state.active) == {"other"}
    assert "m" not in reopened.state.previous
    assert rig.store.state.rev_applied == 3
    # REMOVED comes after the model stopped serving, and the reported rev after that.
    assert rig.applied[-1] == 3


def test_an_empty_document_removes_every_model_and_an_old_one_is_refused(rig: Rig) -> None:
    _v1(rig)
    rig.deploy(2)
    assert rig.runtime.models() == {}
    assert [e.state.value for e in rig.events if e.rev == 2] == ["REMOVED"]
    assert list(rig.store.blobs.iterdir()) == []
    rig.deploy(2, _version(rig, 1, seed=1))  # the same rev again: ignored, nothing comes back
    assert rig.runtime.models() == {}
