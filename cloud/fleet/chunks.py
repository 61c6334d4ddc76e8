"""Artifact chunks over MQTT: requests from many devices are coalesced in a short window
and each chunk is published once per window — the broker fans out, so the cloud's egress
does not grow with the number of devices. A token bucket keeps the broker from flooding.

Requests arrive on the MQTT network thread and are only noted there; whether the asking
device may have the artifact (a registry read) is decided on the broadcaster's own thread,
so a slow database never holds up the network thread's acks and keepalives."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable

from cloud.artifacts.store import ArtifactStore
from cloud.fleet.watch import Throttle
from shared import topics
from shared.errors import NotFound
from shared.messages import ArtifactRequest

__all__ = ["ChunkBroadcaster"]

_LOGGER = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]
ChunkSizeOf = Callable[[str], int | None]
# May this device have this artifact broadcast? (device id, sha256)
Allowed = Callable[[str, str], bool]
MAX_INBOX = 50_000


class ChunkBroadcaster:
    def __init__(
        self,
        store: ArtifactStore,
        publish: Publish,
        *,
        chunk_size_of: ChunkSizeOf,
        allowed: Allowed | None = None,
        window_s: float = 0.05,
        rate_bytes_per_s: float = 32 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.publish = publish
        self.chunk_size_of = chunk_size_of
        self.allowed = allowed
        self.window_s = window_s
        self.rate = rate_bytes_per_s
        self._pending: dict[str, set[int]] = defaultdict(set)
        self._inbox: list[tuple[str | None, ArtifactRequest]] = []
        self._throttle = Throttle()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chunk-broadcaster", daemon=True)
        self.requests = 0
        self.chunks_published = 0
        self.bytes_published = 0
        self.errors = 0
        self.refused = 0  # requests for an artifact the device may not have, or none we have
        self.overflow = 0  # requests dropped while the inbox was full (the device asks again)
        self._tokens = 0.0
        self._refilled = time.monotonic()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def request(self, request: ArtifactRequest, device_id: str | None = None) -> None:
        """Note what ``device_id`` lacks (no I/O: this is the network thread); it is checked
        and answered with the next window."""
        with self._lock:
            if len(self._inbox) >= MAX_INBOX:
                self.overflow += 1
                return
            self._inbox.append((device_id, request))
        self._wake.set()

    def _admit(self) -> None:
        """Move the noted requests that pass the checks into the window's pending chunks."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for device_id, request in inbox:
            try:
                why = self._refusal(device_id, request.sha256)
            except Exception:
                self.errors += 1
                if (held := self._throttle.allow("error")) is not None:
                    _LOGGER.exception("chunk request of %s not checked%s", device_id, _more(held))
                continue
            if why is not None:
                self.refused += 1
                if (held := self._throttle.allow("refused")) is not None:
                    _LOGGER.warning(
                        "refused chunk request of %s for %s: %s%s",
                        device_id, request.sha256[:12], why, _more(held),
                    )  # fmt: skip
                continue
            with self._lock:
                self._pending[request.sha256].update(request.chunks)
                self.requests += 1

    def _refusal(self, device_id: str | None, sha256: str) -> str | None:
        if self.allowed is not None and (device_id is None or not self.allowed(device_id, sha256)):
            return "not in that device's desired state"
        if self.chunk_size_of(sha256) is None:
            return "unknown artifact"
        return None

    def _take(self, size: int) -> None:
        # Bursts of at most 100 ms worth (or one chunk): the broker sees a steady stream.
        burst = max(self.rate * 0.1, size)
        while not self._stop.is_set():
            now = time.monotonic()
            self._tokens = min(burst, self._tokens + (now - self._refilled) * self.rate)
            self._refilled = now
            if self._tokens >= size:
                self._tokens -= size
                return
            time.sleep(min(0.05, (size - self._tokens) / self.rate))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            # Let requests from other devices pile up for one window, then answer all.
            self._stop.wait(self.window_s)
            self._admit()
            with self._lock:
                batch, self._pending = self._pending, defaultdict(set)
            for sha256, indices in batch.items():
                try:
                    self._answer(sha256, indices)
                except Exception:
                    # A disk or database error must not end the broadcast for the whole
                    # fleet: the loop goes on, and devices ask again for what they lack.
                    self.errors += 1
                    _LOGGER.exception("chunk broadcast of %s failed; going on", sha256[:12])

    def _answer(self, sha256: str, indices: set[int]) -> None:
        chunk_size = self.chunk_size_of(sha256)
        if chunk_size is None:
            return
        for index in sorted(indices):
            try:
                data = self.store.read_chunk(sha256, index, chunk_size=chunk_size)
            except NotFound:
                _LOGGER.warning("request for chunk %s of %s beyond its end", index, sha256[:12])
                continue
            self._take(len(data))
            if self.publish(topics.artifact_chunk(sha256, index), data):
                self.chunks_published += 1
                self.bytes_published += len(data)


def _more(held: int) -> str:
    return f" ({held} more not logged)" if held else ""
