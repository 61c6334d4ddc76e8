"""Which artifacts a device may have broadcast to it: those in its own desired state, the same
rule as the HTTP download (issue 8). Cached per device, so a rollout costs one query per
device and not one per chunk request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cloud.context import CloudContext
from cloud.fleet.desired import desired_artifacts_of

__all__ = ["ArtifactAccess"]

_READ_BATCH = 500  # devices per query (bounded IN lists)


class ArtifactAccess:
    """``allowed(device, sha)`` answers from a cache kept ``ttl_s``; a miss reads the registry
    again (a new deployment is allowed at once), at most once per ``min_refresh_s`` per device,
    so a device asking for artifacts it may not have cannot turn requests into queries."""

    def __init__(
        self,
        context: CloudContext,
        *,
        ttl_s: float = 30.0,
        min_refresh_s: float = 1.0,
        max_devices: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context = context
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.max_devices = max_devices
        self.clock = clock
        self.queries = 0
        self._cache: dict[str, tuple[frozenset[str], float]] = {}
        self._lock = threading.Lock()

    def allowed(self, device_id: str, sha256: str) -> bool:
        return self.allowed_many([(device_id, sha256)])[0]

    def allowed_many(self, asks: list[tuple[str, str]]) -> list[bool]:
        """``allowed`` for many (device, sha256) at once: the devices not cached (or cached
        without that artifact, and not just read) are read in one query for all."""
        now = self.clock()
        answers: list[bool | None] = []
        stale: set[str] = set()
        with self._lock:
            for device_id, sha256 in asks:
                cached = self._cache.get(device_id)
                if cached is not None:
                    shas, fetched = cached
                    age = now - fetched
                    if age < self.ttl_s and (sha256 in shas or age < self.min_refresh_s):
                        answers.append(sha256 in shas)
                        continue
                answers.append(None)
                stale.add(device_id)
        fresh = self._refresh(sorted(stale), now) if stale else {}
        return [
            answer if answer is not None else sha256 in fresh[device_id]
            for answer, (device_id, sha256) in zip(answers, asks, strict=True)
        ]

    def forget(self, device_id: str) -> None:
        """The device's desired state changed: read it again on its next request."""
        with self._lock:
            self._cache.pop(device_id, None)

    def _refresh(self, device_ids: list[str], now: float) -> dict[str, frozenset[str]]:
        """Read the devices' desired artifacts: two queries for all of them (a device the
        registry does not have may have none)."""
        found: dict[str, frozenset[str]] = {}
        with self.context.database.session() as s:
            for first in range(0, len(device_ids), _READ_BATCH):
                part = device_ids[first : first + _READ_BATCH]
                found |= desired_artifacts_of(s, part)
        self.queries += 1
        shas = {device_id: found.get(device_id, frozenset()) for device_id in device_ids}
        with self._lock:
            if len(self._cache) + len(shas) > self.max_devices:
                self._cache.clear()
            for device_id, artifacts in shas.items():
                self._cache[device_id] = (artifacts, now)
        return shas
