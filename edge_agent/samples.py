"""The device's sample buffer for learning: labelled inputs on disk (SQLite), bounded in rows
and bytes, read by the Flower ClientApp. Nothing in it ever leaves the device.

Each row is one input (all its named tensors, one row each) with a label and where the label
came from: ``cloud`` (the cloud's answer to a hard input) or ``feedback`` (an app said so).
The same input stored twice is one row: app feedback replaces a cloud label, never the
other way round (an app knows the truth; the cloud model is only better than the edge's).

Eviction, when a bound is passed: the oldest row of the (model, label) with the most rows,
cloud-labelled rows before feedback. Balancing by label keeps a burst of one class from
pushing every other class out, which would bias the head the ClientApp trains.

Crash safety is SQLite's: every add is one transaction in a WAL journal, so a killed agent
leaves the buffer as it was before or after the add, never torn.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput

__all__ = ["AddResult", "BufferStats", "LabelSource", "SampleBuffer", "Samples"]

Array = npt.NDArray[Any]
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model TEXT NOT NULL,
    digest BLOB NOT NULL,
    label INTEGER NOT NULL,
    source TEXT NOT NULL,
    version INTEGER NOT NULL,
    at REAL NOT NULL,
    nbytes INTEGER NOT NULL,
    inputs BLOB NOT NULL,
    UNIQUE (model, digest)
);
CREATE INDEX IF NOT EXISTS ix_samples_group ON samples (model, label, id);
"""
# A cloud label never replaces app feedback; anything else replaces what was there.
_UPSERT = """
INSERT INTO samples (model, digest, label, source, version, at, nbytes, inputs)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (model, digest) DO UPDATE SET
    label = excluded.label, source = excluded.source, version = excluded.version,
    at = excluded.at
WHERE excluded.source = 'feedback' OR samples.source = 'cloud'
"""
_LARGEST_GROUP = """
SELECT model, label FROM samples GROUP BY model, label
ORDER BY COUNT(*) DESC, MIN(id) ASC LIMIT 1
"""
_EVICT_ONE = """
DELETE FROM samples WHERE id = (
    SELECT id FROM samples WHERE model = ? AND label = ?
    ORDER BY source = 'feedback', id LIMIT 1
)
"""


class LabelSource(StrEnum):
    CLOUD = "cloud"  # the cloud model's answer to a hard input
    FEEDBACK = "feedback"  # an app's label, POST /v1/feedback


@dataclass(frozen=True, slots=True)
class AddResult:
    added: int  # new rows
    relabelled: int  # rows that were there and took the new label
    kept: int  # rows that were there with app feedback, which a cloud label does not replace
    evicted: int


@dataclass(frozen=True, slots=True)
class BufferStats:
    samples: int
    bytes: int
    capacity: int
    by_source: dict[str, int]


@dataclass(frozen=True, slots=True)
class Samples:
    """One model's rows, stacked: what the ClientApp trains on."""

    inputs: dict[str, Array]
    labels: npt.NDArray[np.int64]
    sources: list[str]
    versions: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def _pack(row: dict[str, Array]) -> bytes:
    """Tensors as a JSON header (name, dtype, shape) and their raw bytes: no pickle."""
    names = sorted(row)
    header = json.dumps(
        [[n, row[n].dtype.str, list(row[n].shape)] for n in names], separators=(",", ":")
    ).encode()
    body = b"".join(np.ascontiguousarray(row[n]).tobytes() for n in names)
    return struct.pack("<I", len(header)) + header + body


def _unpack(blob: bytes) -> dict[str, Array]:
    (length,) = struct.unpack_from("<I", blob)
    offset = 4 + length
    out: dict[str, Array] = {}
    for name, dtype, shape in json.loads(blob[4:offset]):
        array = np.frombuffer(blob, dtype=np.dtype(dtype), count=int(np.prod(shape)), offset=offset)
        out[name] = array.reshape(shape)
        offset += array.nbytes
    return out


def _digest(model: str, packed: bytes) -> bytes:
    return hashlib.blake2b(model.encode() + b"\0" + packed, digest_size=16).digest()


class SampleBuffer:
    """Thread-safe within a process; another process (the ClientApp) may read at once."""

    def __init__(self, path: Path, *, max_samples: int, max_bytes: int) -> None:
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("a sample buffer holds at least one sample and one byte")
        self.path = path
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a process crash loses nothing committed; power loss may lose
        # the last few adds, never the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    @classmethod
    def open_existing(cls, path: Path) -> SampleBuffer:
        """The agent's buffer, for reading (the ClientApp); refused if there is none."""
        if not path.is_file():
            raise InvalidInput(f"no sample buffer at {path}: is learning on in the agent?")
        # A reader never adds, so never evicts: the agent's bounds are the agent's business.
        return cls(path, max_samples=1 << 62, max_bytes=1 << 62)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(
        self,
        model: str,
        version: int,
        rows: dict[str, Array],
        labels: Sequence[int],
        source: LabelSource,
    ) -> AddResult:
        """Store each row of ``rows`` (every tensor's first dimension is the row) with its
        label, in one transaction, then evict down to the bounds."""
        count = len(labels)
        if not rows or any(len(a) != count for a in rows.values()):
            sizes = [len(a) for a in rows.values()]
            raise InvalidInput(f"{count} labels for inputs of {sizes} rows")
        now = time.time()
        records = []
        for i in range(count):
            packed = _pack({name: array[i] for name, array in rows.items()})
            records.append(
                (model, _digest(model, packed), int(labels[i]), source.value, version, now,
                 len(packed), packed)
            )  # fmt: skip
        added = relabelled = kept = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for record in records:
                    before = self._db.total_changes
                    existed = self._db.execute(
                        "SELECT 1 FROM samples WHERE model = ? AND digest = ?", record[:2]
                    ).fetchone()
                    self._db.execute(_UPSERT, record)
                    changed = self._db.total_changes > before
                    if existed is None:
                        added += 1
                    elif changed:
                        relabelled += 1
                    else:
                        kept += 1
                evicted = self._evict()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return AddResult(added, relabelled, kept, evicted)

    def _evict(self) -> int:
        evicted = 0
        while True:
            rows, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM samples"
            ).fetchone()
            if rows <= self.max_samples and size <= self.max_bytes:
                return evicted
            model, label = self._db.execute(_LARGEST_GROUP).fetchone()
            self._db.execute(_EVICT_ONE, (model, label))
            evicted += 1

    def stats(self) -> BufferStats:
        with self._lock:
            rows, size = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM samples"
            ).fetchone()
            by_source = dict(
                self._db.execute("SELECT source, COUNT(*) FROM samples GROUP BY source").fetchall()
            )
        return BufferStats(int(rows), int(size), self.max_samples, by_source)

    def load(self, model: str) -> Samples:
        """Every row of ``model``, oldest first."""
        with self._lock:
            found = self._db.execute(
                "SELECT inputs, label, source, version FROM samples WHERE model = ? ORDER BY id",
                (model,),
            ).fetchall()
        if not found:
            return Samples({}, np.zeros(0, dtype=np.int64), [], [])
        rows = [_unpack(blob) for blob, *_ in found]
        names = sorted(rows[0])
        if any(sorted(r) != names for r in rows):
            raise InvalidInput(f"stored samples of {model!r} do not all have the inputs {names}")
        inputs = {n: np.stack([r[n] for r in rows]) for n in names}
        labels = np.array([label for _, label, _, _ in found], dtype=np.int64)
        return Samples(inputs, labels, [s for _, _, s, _ in found], [int(v) for *_, v in found])
