"""ModelStore: artifacts on disk, verified; downloads that survive a crash; atomic activation.

Layout under ``root``::

    state.json              highest rev applied; per model the active and previous version
    blobs/<sha256>          complete artifacts, verified against their sha256
    partial/<sha256>.part   an artifact being assembled, chunk by chunk
    partial/<sha256>.done   indices of the chunks written (data fsynced before the index)

``state.json`` is only ever replaced atomically, and only points at verified blobs, so
whatever moment the process dies at, the next start finds a complete, verified model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import IntegrityError, InvalidInput
from shared.fsutil import atomic_write, fsync_dir
from shared.messages import ArtifactRef, Manifest

__all__ = ["Installed", "ModelStore", "StoreState"]

_LOGGER = logging.getLogger(__name__)


@dataclass
class Installed:
    manifest: Manifest
    rollout_id: int | None = None

    @property
    def version(self) -> int:
        return self.manifest.version

    def to_json(self) -> dict[str, Any]:
        return {"manifest": self.manifest.model_dump(mode="json"), "rollout_id": self.rollout_id}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Installed:
        return cls(Manifest.model_validate(raw["manifest"]), raw.get("rollout_id"))


@dataclass
class StoreState:
    rev_applied: int = 0
    active: dict[str, Installed] = field(default_factory=dict)
    previous: dict[str, Installed] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "rev_applied": self.rev_applied,
                "active": {k: v.to_json() for k, v in self.active.items()},
                "previous": {k: v.to_json() for k, v in self.previous.items()},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> StoreState:
        raw = json.loads(data)
        return cls(
            rev_applied=int(raw.get("rev_applied", 0)),
            active={k: Installed.from_json(v) for k, v in raw.get("active", {}).items()},
            previous={k: Installed.from_json(v) for k, v in raw.get("previous", {}).items()},
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while block := src.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _drop_torn_tail(log: Path) -> None:
    """Cut a last line that a crash left without its newline, before appending after it."""
    if not log.exists() or log.stat().st_size == 0:
        return
    with log.open("rb") as src:
        src.seek(-1, os.SEEK_END)
        if src.read(1) == b"\n":
            return
    data = log.read_bytes()
    with log.open("r+b") as out:
        out.truncate(data.rfind(b"\n") + 1)
        out.flush()
        os.fsync(out.fileno())


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.partial = root / "partial"
        for folder in (self.blobs, self.partial):
            folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._done: dict[str, set[int]] = {}
        self.state = self._load_state()

    # -- state ---------------------------------------------------------------------------

    def _load_state(self) -> StoreState:
        path = self.root / "state.json"
        if not path.exists():
            return StoreState()
        try:
            state = StoreState.from_bytes(path.read_bytes())
        except (ValueError, KeyError, TypeError) as exc:
            # Cannot happen with atomic writes; if it does (disk fault), start clean and say so.
            _LOGGER.error("state.json unreadable (%s); starting without a model", exc)
            return StoreState()
        for name in list(state.active):
            if not self._blob_ok(state.active[name].manifest.artifact):
                _LOGGER.error("active %s blob failed verification; falling back", name)
                fallback = state.previous.pop(name, None)
                if fallback and self._blob_ok(fallback.manifest.artifact):
                    state.active[name] = fallback
                else:
                    del state.active[name]
        return state

    def _save(self) -> None:
        atomic_write(self.root / "state.json", self.state.to_bytes())

    def set_rev_applied(self, rev: int) -> None:
        with self._lock:
            self.state.rev_applied = max(self.state.rev_applied, rev)
            self._save()

    def active(self, model: str) -> Installed | None:
        return self.state.active.get(model)

    # -- blobs ---------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def _blob_ok(self, ref: ArtifactRef) -> bool:
        path = self.blob_path(ref.sha256)
        return (
            path.is_file() and path.stat().st_size == ref.size and _sha256_file(path) == ref.sha256
        )

    def has_blob(self, ref: ArtifactRef) -> bool:
        return self.blob_path(ref.sha256).is_file()

    # -- downloads -----------------------------------------------------------------------

    def _part(self, ref: ArtifactRef) -> tuple[Path, Path]:
        return self.partial / f"{ref.sha256}.part", self.partial / f"{ref.sha256}.done"

    def _chunks(self, ref: ArtifactRef) -> set[int]:
        """The live set of chunk indices on disk; the caller holds the lock.

        Read from the log once, then kept in memory (the download loop asks after every
        chunk). Chunk writers mutate it on the MQTT thread, so it never leaves the lock:
        readers get copies or values computed under it."""
        cached = self._done.get(ref.sha256)
        if cached is not None:
            return cached
        _, done = self._part(ref)
        indices: set[int] = set()
        if done.exists():
            _drop_torn_tail(done)
            # Only newline-terminated lines count: a torn last line ("1" of "12")
            # could name a chunk whose data never landed. Data is fsynced before
            # its line is appended, so every whole line is true.
            for line in done.read_text().split("\n")[:-1]:
                if line.isdigit() and int(line) < len(ref.chunks):
                    indices.add(int(line))
        self._done[ref.sha256] = indices
        return indices

    def chunks_done(self, ref: ArtifactRef) -> frozenset[int]:
        """A snapshot of the indices of the chunks on disk."""
        with self._lock:
            return frozenset(self._chunks(ref))

    def has_chunk(self, ref: ArtifactRef, index: int) -> bool:
        with self._lock:
            return index in self._chunks(ref)

    def first_missing(self, ref: ArtifactRef) -> int | None:
        """The lowest index of a chunk not on disk yet; None when none is missing."""
        with self._lock:
            done = self._chunks(ref)
            return next((i for i in range(len(ref.chunks)) if i not in done), None)

    def complete(self, ref: ArtifactRef) -> bool:
        """Every chunk is on disk (not yet checked as a whole: see :meth:`finish`)."""
        with self._lock:
            return len(self._chunks(ref)) == len(ref.chunks)

    def missing_chunks(self, ref: ArtifactRef) -> list[int]:
        with self._lock:
            done = self._chunks(ref)
            return [i for i in range(len(ref.chunks)) if i not in done]

    def bytes_done(self, ref: ArtifactRef) -> int:
        with self._lock:
            done = self._chunks(ref)
            return sum(min(ref.chunk_size, ref.size - i * ref.chunk_size) for i in done)

    def write_chunk(self, ref: ArtifactRef, index: int, data: bytes) -> bool:
        """Keep a chunk if its hash matches the manifest; False (and nothing kept) if not."""
        if not 0 <= index < len(ref.chunks):
            raise InvalidInput(f"chunk {index} outside artifact {ref.sha256[:12]}")
        expected = min(ref.chunk_size, ref.size - index * ref.chunk_size)
        if len(data) != expected or hashlib.sha256(data).hexdigest() != ref.chunks[index]:
            return False
        part, done = self._part(ref)
        with self._lock:
            indices = self._chunks(ref)  # loads (and repairs) the log before appending
            fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, index * ref.chunk_size)
                os.fsync(fd)
            finally:
                os.close(fd)
            with done.open("a") as log:
                log.write(f"{index}\n")
                log.flush()
                os.fsync(log.fileno())
            indices.add(index)
        return True

    def finish(self, ref: ArtifactRef) -> Path:
        """Check the whole file against the manifest and move it among the blobs."""
        part, done = self._part(ref)
        with self._lock:
            if self.missing_chunks(ref):
                raise IntegrityError(f"artifact {ref.sha256[:12]} is incomplete")
            os.truncate(part, ref.size)
            actual = _sha256_file(part)
            if actual != ref.sha256:
                self.discard(ref)
                raise IntegrityError(
                    f"artifact sha256 {actual[:12]}… does not match "
                    f"the manifest's {ref.sha256[:12]}…"
                )
            target = self.blob_path(ref.sha256)
            os.replace(part, target)
            fsync_dir(self.blobs)
            done.unlink(missing_ok=True)
            self._done.pop(ref.sha256, None)
            return target

    def discard(self, ref: ArtifactRef) -> None:
        with self._lock:
            for path in self._part(ref):
                path.unlink(missing_ok=True)
            self._done.pop(ref.sha256, None)

    # -- activation ----------------------------------------------------------------------

    def activate(self, installed: Installed) -> None:
        """Make ``installed`` the active version of its model; the old one becomes previous."""
        name = installed.manifest.model
        with self._lock:
            if not self._blob_ok(installed.manifest.artifact):
                raise IntegrityError(f"{name}:{installed.version} blob failed verification")
            current = self.state.active.get(name)
            if (
                current is not None
                and current.manifest.artifact.sha256 != installed.manifest.artifact.sha256
            ):
                self.state.previous[name] = current
            self.state.active[name] = installed
            self._save()
            self._collect_garbage()

    def remove(self, model: str) -> Installed | None:
        """Take ``model`` off this device: out of the active set (and its previous version
        with it, there is nothing to roll back to), in one atomic write as activation is, then
        its blobs go once nothing else refers to them. Returns what was active (None: none)."""
        with self._lock:
            removed = self.state.active.pop(model, None)
            dropped = self.state.previous.pop(model, None)
            if removed is None and dropped is None:
                return None
            self._save()
            self._collect_garbage()
            return removed

    def discard_partials(self, keep: set[str]) -> None:
        """Forget downloads of artifacts outside ``keep`` (the ones the desired state still
        names): a download abandoned for a newer document must not hold its disk forever."""
        with self._lock:
            for path in self.partial.iterdir():
                sha256 = path.name.split(".", 1)[0]
                if sha256 not in keep:
                    path.unlink(missing_ok=True)
                    self._done.pop(sha256, None)

    def _collect_garbage(self) -> None:
        keep = {i.manifest.artifact.sha256 for i in self.state.active.values()}
        keep |= {i.manifest.artifact.sha256 for i in self.state.previous.values()}
        for blob in self.blobs.iterdir():
            if blob.name not in keep and not blob.name.startswith("."):
                blob.unlink(missing_ok=True)
