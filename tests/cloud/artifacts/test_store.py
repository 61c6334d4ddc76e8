"""The content-addressed artifact store."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from cloud.artifacts.store import ArtifactStore
from shared.errors import NotFound, PayloadTooLarge


def test_bytes_are_named_by_their_hash_and_chunk_hashes_are_exact(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, chunk_size=1024)
    data = os.urandom(3000)
    # Blocks that straddle chunk boundaries must give the same chunk hashes.
    info = store.put_stream([data[:700], data[700:2500], data[2500:]])
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size == 3000
    assert info.chunk_hashes == [
        hashlib.sha256(data[i : i + 1024]).hexdigest() for i in range(0, 3000, 1024)
    ]
    assert store.path(info.sha256).read_bytes() == data
    assert store.read_chunk(info.sha256, 2) == data[2048:]


def test_an_oversize_stream_leaves_no_file(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, chunk_size=1024)
    with pytest.raises(PayloadTooLarge):
        store.put_stream([b"x" * 600, b"x" * 600], max_bytes=1000)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_reading_what_is_not_there_is_not_found(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path, chunk_size=1024)
    info = store.put_bytes(b"abc")
    with pytest.raises(NotFound):
        store.read_chunk(info.sha256, 1)
    with pytest.raises(NotFound):
        store.read_chunk("f" * 64, 0)
