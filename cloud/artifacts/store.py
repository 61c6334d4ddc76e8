"""Content-addressed store: files named by sha256, written atomically, read by chunk."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from shared.errors import NotFound, PayloadTooLarge
from shared.fsutil import fsync_dir
from shared.topics import validate_sha256

__all__ = ["ArtifactInfo", "ArtifactStore"]


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    sha256: str
    size: int
    chunk_size: int
    chunk_hashes: list[str]


class ArtifactStore:
    """``root/ab/abcdef…`` holds the bytes; nothing is ever half-written under its name."""

    def __init__(self, root: Path, *, chunk_size: int) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        validate_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def put_stream(self, blocks: Iterable[bytes], *, max_bytes: int | None = None) -> ArtifactInfo:
        """Store the bytes of ``blocks``; hash, chunk-hash and fsync on the way."""
        whole = hashlib.sha256()
        chunk_hashes: list[str] = []
        current = hashlib.sha256()
        in_chunk = 0
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                for block in blocks:
                    size += len(block)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"artifact exceeds {max_bytes} bytes")
                    out.write(block)
                    whole.update(block)
                    view = memoryview(block)
                    while view:
                        take = min(len(view), self.chunk_size - in_chunk)
                        current.update(view[:take])
                        in_chunk += take
                        view = view[take:]
                        if in_chunk == self.chunk_size:
                            chunk_hashes.append(current.hexdigest())
                            current, in_chunk = hashlib.sha256(), 0
                out.flush()
                os.fsync(out.fileno())
            if in_chunk:
                chunk_hashes.append(current.hexdigest())
            sha256 = whole.hexdigest()
            final = self.path(sha256)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            fsync_dir(final.parent)
            return ArtifactInfo(sha256, size, self.chunk_size, chunk_hashes)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes) -> ArtifactInfo:
        return self.put_stream([data])

    def put_file(self, path: Path, *, max_bytes: int | None = None) -> ArtifactInfo:
        with path.open("rb") as src:
            return self.put_stream(iter(lambda: src.read(1 << 20), b""), max_bytes=max_bytes)

    def read_chunk(self, sha256: str, index: int, *, chunk_size: int | None = None) -> bytes:
        size = chunk_size or self.chunk_size
        path = self.path(sha256)
        if not path.is_file():
            raise NotFound(f"unknown artifact {sha256}")
        with path.open("rb") as src:
            src.seek(index * size)
            data = src.read(size)
        if not data:
            raise NotFound(f"artifact {sha256} has no chunk {index}")
        return data

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
