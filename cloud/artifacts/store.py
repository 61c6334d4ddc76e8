"""Content-addressed store: files named by sha256, written atomically, read by chunk.

Bytes are first written and hashed in a private staging folder, where a caller checks them;
only bytes it keeps are placed under their hash. A placed file is *pinned* until the
caller's unit of work ends, and only an unpinned file that nothing uses may be removed: a
refused or rolled-back upload never deletes a file that a concurrent upload of the same
bytes (or a registered version) relies on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.errors import NotFound, PayloadTooLarge
from shared.fsutil import fsync_dir
from shared.topics import validate_sha256

__all__ = ["ArtifactInfo", "ArtifactStore", "Staged"]

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ArtifactInfo:
    sha256: str
    size: int
    chunk_size: int
    chunk_hashes: list[str]


@dataclass(frozen=True, slots=True)
class Staged:
    """Bytes written and hashed, not yet under their hash: ``path`` is private to the caller."""

    info: ArtifactInfo
    path: Path


class ArtifactStore:
    """``root/ab/abcdef…`` holds the bytes; nothing is ever half-written under its name."""

    def __init__(self, root: Path, *, chunk_size: int) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._pins: Counter[str] = Counter()
        # Which placement last wrote each hash (a process-wide count; one int per artifact):
        # a removal decided before a newer placement of the same bytes must not go ahead.
        self._placements = 0
        self._placed_by: dict[str, int] = {}

    def path(self, sha256: str) -> Path:
        validate_sha256(sha256)
        return self.root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    @contextmanager
    def stage(self, blocks: Iterable[bytes], *, max_bytes: int | None = None) -> Iterator[Staged]:
        """Write ``blocks`` to a file in a folder of its own (so nothing else is reachable
        beside it), hashing and chunk-hashing on the way; the folder goes when the block ends."""
        # Absolute, so that a checker's message naming it is recognised as a server path.
        folder = Path(tempfile.mkdtemp(dir=self._tmp)).resolve()
        try:
            staged = folder / "data"
            info = self._write(blocks, staged, max_bytes=max_bytes)
            yield Staged(info, staged)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def place(self, staged: Staged) -> ArtifactInfo:
        """Move staged bytes under their hash, pinned until :meth:`release`."""
        return self._place(staged, pin=True)

    def release(self, sha256: str, *, in_use: Callable[[], bool]) -> None:
        """Drop one pin; once none is left, remove the file unless ``in_use()`` says a
        registered row names it (asked without the lock, so a slow database blocks no
        placement; a placement meanwhile cancels the removal)."""
        with self._guard:
            self._pins[sha256] -= 1
            if self._pins[sha256] > 0:
                return
            del self._pins[sha256]
            placement = self._placed_by.get(sha256)
        try:
            used = in_use()
        except Exception:
            _LOGGER.warning(
                "cannot tell whether artifact %s is in use; kept", sha256, exc_info=True
            )
            return
        if used:
            return
        with self._guard:
            if self._pins[sha256] == 0 and self._placed_by.get(sha256) == placement:
                self._placed_by.pop(sha256, None)
                self.path(sha256).unlink(missing_ok=True)

    def put_stream(self, blocks: Iterable[bytes], *, max_bytes: int | None = None) -> ArtifactInfo:
        """Store the bytes of ``blocks`` unchecked and unpinned (seeding, tools, tests)."""
        with self.stage(blocks, max_bytes=max_bytes) as staged:
            return self._place(staged, pin=False)

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
        """Remove the file outright: for tools that know nothing uses it."""
        self.path(sha256).unlink(missing_ok=True)

    def _place(self, staged: Staged, *, pin: bool) -> ArtifactInfo:
        final = self.path(staged.info.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Under the lock, a placement and a removal of the same hash never interleave.
        with self._guard:
            os.replace(staged.path, final)
            fsync_dir(final.parent)
            self._placements += 1
            self._placed_by[staged.info.sha256] = self._placements
            if pin:
                self._pins[staged.info.sha256] += 1
        return staged.info

    def _write(
        self, blocks: Iterable[bytes], target: Path, *, max_bytes: int | None
    ) -> ArtifactInfo:
        whole = hashlib.sha256()
        chunk_hashes: list[str] = []
        current = hashlib.sha256()
        in_chunk = 0
        size = 0
        with target.open("wb") as out:
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
        return ArtifactInfo(whole.hexdigest(), size, self.chunk_size, chunk_hashes)
