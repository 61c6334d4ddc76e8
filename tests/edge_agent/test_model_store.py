"""ModelStore: chunks checked on the way in, progress that survives a restart, atomic swaps."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest

from edge_agent.model_store import Installed, ModelStore
from shared.errors import IntegrityError
from shared.messages import ArtifactRef, Manifest

CHUNK = 1024


def _manifest(data: bytes, version: int = 1) -> Manifest:
    ref = ArtifactRef.of(data, CHUNK)
    spec = [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    return Manifest.model_validate(
        {"model": "m", "version": version, "precision": "fp32", "artifact": ref.model_dump(),
         "inputs": spec, "outputs": spec}
    )  # fmt: skip


def _fill(store: ModelStore, ref: ArtifactRef, data: bytes, indices: list[int]) -> None:
    for i in indices:
        assert store.write_chunk(ref, i, data[i * CHUNK : (i + 1) * CHUNK])


def test_a_chunk_with_the_wrong_hash_is_not_kept(tmp_path: Path) -> None:
    data = os.urandom(3000)
    ref = _manifest(data).artifact
    store = ModelStore(tmp_path)
    assert not store.write_chunk(ref, 0, b"x" * CHUNK)
    assert not store.write_chunk(ref, 2, data[2048:] + b"extra")
    assert store.missing_chunks(ref) == [0, 1, 2]


def test_progress_survives_a_restart_and_a_torn_log_line(tmp_path: Path) -> None:
    data = os.urandom(5000)
    ref = _manifest(data).artifact
    _fill(ModelStore(tmp_path), ref, data, [0, 3])
    with (tmp_path / "partial" / f"{ref.sha256}.done").open("a") as log:
        log.write("4")  # a crash mid-append: no newline, and chunk 4's data never landed
    reopened = ModelStore(tmp_path)
    assert reopened.missing_chunks(ref) == [1, 2, 4]
    _fill(reopened, ref, data, [1, 2, 4])
    path = reopened.finish(ref)
    assert path.read_bytes() == data


def test_a_whole_file_that_does_not_match_is_discarded(tmp_path: Path) -> None:
    """Chunks that match their own hashes but a manifest whose whole-file hash is wrong."""
    data = os.urandom(2500)
    manifest = _manifest(data)
    forged = manifest.artifact.model_copy(update={"sha256": "f" * 64})
    store = ModelStore(tmp_path)
    _fill(store, forged, data, [0, 1, 2])
    with pytest.raises(IntegrityError, match="does not match"):
        store.finish(forged)
    assert store.missing_chunks(forged) == [0, 1, 2]


def test_activation_keeps_the_previous_version_and_collects_the_rest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    blobs = [os.urandom(1500 + i) for i in range(3)]
    for version, data in enumerate(blobs, start=1):
        manifest = _manifest(data, version)
        _fill(store, manifest.artifact, data, list(range(len(manifest.artifact.chunks))))
        store.finish(manifest.artifact)
        store.activate(Installed(manifest))
    reopened = ModelStore(tmp_path)
    assert reopened.active("m").version == 3  # type: ignore[union-attr]
    assert reopened.state.previous["m"].version == 2
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(
        hashlib.sha256(b).hexdigest() for b in blobs[1:]
    )


def test_a_corrupted_active_blob_falls_back_to_the_previous_on_start(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first, second = os.urandom(1200), os.urandom(1300)
    for version, data in enumerate((first, second), start=1):
        manifest = _manifest(data, version)
        _fill(store, manifest.artifact, data, list(range(len(manifest.artifact.chunks))))
        store.finish(manifest.artifact)
        store.activate(Installed(manifest))
    (tmp_path / "blobs" / hashlib.sha256(second).hexdigest()).write_bytes(b"bit rot")
    assert ModelStore(tmp_path).active("m").version == 1  # type: ignore[union-attr]


def test_chunk_sets_are_read_under_the_lock_while_chunks_arrive(tmp_path: Path) -> None:
    """Chunks land on the MQTT thread while the download loop reads progress: with 1,000
    agents this raised "Set changed size during iteration" and left devices at DOWNLOADING.
    Thread switches are made very frequent so that the interleaving shows up every run."""
    data = os.urandom(CHUNK * 2000)
    ref = ArtifactRef.of(data, CHUNK)
    store = ModelStore(tmp_path)
    _fill(store, ref, data, list(range(1500)))  # a large set makes each read a long iteration
    errors: list[Exception] = []
    finished = threading.Event()

    def writer(indices: range) -> None:
        for i in indices:
            if finished.is_set():
                return
            store.write_chunk(ref, i, data[i * CHUNK : (i + 1) * CHUNK])

    def reader() -> None:
        while not finished.is_set():
            try:
                store.bytes_done(ref)  # what the download loop reports after every chunk
            except RuntimeError as exc:
                errors.append(exc)
                finished.set()

    readers = [threading.Thread(target=reader) for _ in range(3)]
    writers = [threading.Thread(target=writer, args=(range(1500 + k, 2000, 2),)) for k in range(2)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        finished.set()
        for thread in readers:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert store.missing_chunks(ref) == []
    assert store.bytes_done(ref) == len(data)


def test_chunks_done_is_a_snapshot_that_later_chunks_do_not_change(tmp_path: Path) -> None:
    data = os.urandom(3000)
    ref = _manifest(data).artifact
    store = ModelStore(tmp_path)
    _fill(store, ref, data, [0])
    seen = store.chunks_done(ref)
    _fill(store, ref, data, [1, 2])
    assert seen == {0}
    assert store.chunks_done(ref) == {0, 1, 2}


def test_a_removed_model_is_gone_after_a_restart_and_only_blobs_nothing_uses_go(
    tmp_path: Path,
) -> None:
    """'m' ran v1 then v2; 'twin' runs the same bytes as v2. Removing 'm' drops its active
    and previous versions in one atomic write (a fresh store, as after a crash, agrees):
    v1's blob goes, v2's stays because 'twin' still uses it. A partial download is kept
    only while a wanted artifact is named."""
    store = ModelStore(tmp_path)
    v1_data, v2_data = os.urandom(3000), os.urandom(2500)
    v1, v2 = _manifest(v1_data, 1), _manifest(v2_data, 2)
    for manifest, data in ((v1, v1_data), (v2, v2_data)):
        _fill(store, manifest.artifact, data, [0, 1, 2] if len(data) > 2048 else [0, 1])
        store.finish(manifest.artifact)
        store.activate(Installed(manifest))
    store.activate(Installed(v2.model_copy(update={"model": "twin"})))
    assert store.remove("m") is not None
    assert store.remove("m") is None

    reopened = ModelStore(tmp_path)
    assert set(reopened.state.active) == {"twin"}
    assert reopened.state.previous == {}
    assert {p.name for p in store.blobs.iterdir()} == {v2.artifact.sha256}

    pending_data = os.urandom(2000)
    pending = _manifest(pending_data, 3).artifact
    _fill(store, pending, pending_data, [0])
    store.discard_partials({pending.sha256})
    assert store.chunks_done(pending) == {0}
    store.discard_partials(set())
    assert list(store.partial.iterdir()) == []
    assert store.missing_chunks(pending) == [0, 1]
