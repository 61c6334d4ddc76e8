"""One onnxruntime session per artifact for all the simulated devices of a process.

Each device still downloads its artifact, verifies every chunk and the whole file against the
signed manifest, runs the health check's golden inputs on the session, compares the outputs
and activates: only building the session is shared, and only for bytes that hashed to the
same sha256 on this device's own disk (the store verified them before the runtime sees the
path), so the session is the one the device would have built. ``run`` is thread-safe in
onnxruntime, so sharing it changes no answer."""

from __future__ import annotations

import threading
from pathlib import Path

import onnxruntime as ort

from edge_agent.runtime import LoadedModel, Runtime, load_session
from shared.messages import Manifest

__all__ = ["SessionCache", "SharedRuntime"]


class SessionCache:
    """Sessions by (artifact sha256, threads), built once each; a failed build is not kept
    (the next device tries again, and fails its health check the same way)."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], ort.InferenceSession] = {}
        self._building: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self.built = 0
        self.shared = 0

    def session(self, sha256: str, path: Path, *, threads: int) -> ort.InferenceSession:
        key = (sha256, threads)
        with self._lock:
            building = self._building.setdefault(key, threading.Lock())
        with building:  # devices asking at once wait for the one that builds it
            with self._lock:
                found = self._sessions.get(key)
                if found is not None:
                    self.shared += 1
                    return found
            session = load_session(path, threads=threads)
            with self._lock:
                self._sessions[key] = session
                self.built += 1
            return session

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)


class SharedRuntime(Runtime):
    """A device's runtime (its own models, swapped on their own) whose sessions come from a
    process-wide :class:`SessionCache`."""

    def __init__(self, cache: SessionCache, *, threads: int = 1) -> None:
        super().__init__(threads=threads)
        self.cache = cache

    def load(self, manifest: Manifest, path: Path) -> LoadedModel:
        session = self.cache.session(manifest.artifact.sha256, path, threads=self.threads)
        return LoadedModel(manifest, session, [o.name for o in session.get_outputs()])
