"""Staging, pins and release: a file leaves the store only when nothing may still use it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cloud.artifacts.store import ArtifactStore
from shared.errors import PayloadTooLarge


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_staged_bytes_are_private_until_placed(tmp_path: Path) -> None:
    """Checking happens on a private copy: nothing is under the hash before ``place``, and
    a staged upload that is never placed leaves no file at all."""
    store = ArtifactStore(tmp_path, chunk_size=4)
    with store.stage([b"abcdef"]) as staged:
        assert staged.info.sha256 == hashlib.sha256(b"abcdef").hexdigest()
        assert staged.info.chunk_hashes == [
            hashlib.sha256(b"abcd").hexdigest(),
            hashlib.sha256(b"ef").hexdigest(),
        ]
        assert staged.path.read_bytes() == b"abcdef"
        assert not store.exists(staged.info.sha256)
    assert _files(tmp_path) == []
    with pytest.raises(PayloadTooLarge), store.stage([b"x" * 10], max_bytes=5):
        pass
    assert _files(tmp_path) == []


def test_a_released_file_goes_only_when_unpinned_and_unused(tmp_path: Path) -> None:
    """Two uploads place the same bytes; the first to give up keeps the file for the other;
    the last one removes it only if no registered row names it."""
    store = ArtifactStore(tmp_path, chunk_size=1024)
    placed = []
    for _ in range(2):
        with store.stage([b"same bytes"]) as staged:
            placed.append(store.place(staged))
    sha = placed[0].sha256
    store.release(sha, in_use=lambda: False)
    assert store.exists(sha)
    store.release(sha, in_use=lambda: True)
    assert store.exists(sha)
    with store.stage([b"same bytes"]) as staged:
        store.place(staged)
    store.release(sha, in_use=lambda: False)
    assert not store.exists(sha)


def test_a_placement_while_the_last_release_asks_the_database_keeps_the_file(
    tmp_path: Path,
) -> None:
    """The database is asked without the lock; an upload of the same bytes placed meanwhile
    (and already done with its pin) must not lose its file to the stale answer."""
    store = ArtifactStore(tmp_path, chunk_size=1024)
    with store.stage([b"bytes"]) as staged:
        sha = store.place(staged).sha256

    def meanwhile_another_upload_registers() -> bool:
        with store.stage([b"bytes"]) as again:
            store.place(again)
        store.release(sha, in_use=lambda: True)  # it committed: its row names the file
        return False  # the answer read before that commit

    store.release(sha, in_use=meanwhile_another_upload_registers)
    assert store.exists(sha)


def test_when_the_database_cannot_answer_the_file_is_kept(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, chunk_size=1024)
    with store.stage([b"bytes"]) as staged:
        sha = store.place(staged).sha256

    def down() -> bool:
        raise ConnectionError("database down")

    store.release(sha, in_use=down)
    assert store.exists(sha)
