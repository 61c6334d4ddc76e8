"""Which artifacts a device may have broadcast to it: those in its own desired state, the same
rule as the HTTP download (issue 8). Cached per device, so a rollout costs one query per
device and not one per chunk request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from cloud.context import CloudContext
from cloud.fleet.desired import desired_artifacts
from cloud.registry.tables import Device

__all__ = ["ArtifactAccess"]


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
        now = self.clock()
        with self._lock:
            cached = self._cache.get(device_id)
        if cached is not None:
            shas, fetched = cached
            age = now - fetched
            if age < self.ttl_s and (sha256 in shas or age < self.min_refresh_s):
                return sha256 in shas
        return sha256 in self._refresh(device_id, now)

    def forget(self, device_id: str) -> None:
        """The device's desired state changed: read it again on its next request."""
        with self._lock:
            self._cache.pop(device_id, None)

    def _refresh(self, device_id: str, now: float) -> frozenset[str]:
        with self.context.database.session() as s:
            device = s.get(Device, device_id)
            shas = frozenset(desired_artifacts(s, device=device)) if device else frozenset()
        self.queries += 1
        with self._lock:
            if len(self._cache) >= self.max_devices:
                self._cache.clear()
            self._cache[device_id] = (shas, now)
        return shas
