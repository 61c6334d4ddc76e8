"""Warm sessions: a version's ONNX is loaded on first use and kept, least recently used
evicted first once the loaded bytes pass the bound. A load holds only its own version's
lock, so other models' requests go on meanwhile."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloud.inference.batcher import BatchConfig, Batcher
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine
from cloud.inference.metrics import InferenceMetrics
from shared.errors import InferenceFailed

__all__ = ["Loaded", "SessionPool", "batch_config"]

_LOGGER = logging.getLogger(__name__)

# Keys a version's ONNX metadata (metadata_props) may set to batch differently.
MAX_BATCH_KEY = "edgefleet.max_batch_size"
QUEUE_DELAY_KEY = "edgefleet.max_queue_delay_ms"

Key = tuple[str, int]
OpenEngine = Callable[[VersionInfo], Engine]


@dataclass(slots=True)
class Loaded:
    info: VersionInfo
    engine: Engine
    batcher: Batcher


def batch_config(info: VersionInfo, engine: Engine, default: BatchConfig) -> BatchConfig:
    """The defaults, overridden by the version's own metadata; no batching for a model
    whose inputs have a fixed first dimension."""
    size, delay_s = default.max_batch_size, default.max_queue_delay_s
    meta = engine.metadata
    try:
        if MAX_BATCH_KEY in meta:
            size = max(0, min(int(meta[MAX_BATCH_KEY]), 4096))
        if QUEUE_DELAY_KEY in meta:
            delay_s = max(0.0, min(float(meta[QUEUE_DELAY_KEY]), 1000.0)) / 1000
    except ValueError:
        _LOGGER.warning("%s:%s: batching metadata is not a number; defaults used", *info.key)
    if any(not s.shape or s.shape[0] >= 0 for s in info.inputs):
        size = 0
    return BatchConfig(size, delay_s, default.max_queue, default.queue_timeout_s)


class SessionPool:
    def __init__(
        self,
        open_engine: OpenEngine,
        *,
        memory_bytes: int,
        defaults: BatchConfig,
        metrics: InferenceMetrics,
    ) -> None:
        self.open_engine = open_engine
        self.memory_bytes = memory_bytes
        self.defaults = defaults
        self.metrics = metrics
        self._lock = threading.Lock()
        self._loaded: collections.OrderedDict[Key, Loaded] = collections.OrderedDict()
        self._loading: dict[Key, threading.Lock] = {}
        self._closed = False

    def get(self, info: VersionInfo) -> Loaded:
        """The warm session of ``info``, loaded now if it is not (InferenceFailed if it
        cannot be)."""
        key = info.key
        with self._lock:
            entry = self._loaded.get(key)
            if entry is not None:
                self._loaded.move_to_end(key)
                return entry
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._loaded.get(key)
                if entry is not None:
                    return entry
            entry = self._load(info)
            with self._lock:
                self._loaded[key] = entry
                self._loading.pop(key, None)
                evicted = self._evict(keep=key)
                self.metrics.loaded_bytes.set(sum(e.info.size for e in self._loaded.values()))
        for old in evicted:
            old.batcher.close()
        return entry

    def _load(self, info: VersionInfo) -> Loaded:
        try:
            engine = self.open_engine(info)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            _LOGGER.warning("loading %s:%s failed: %s", *info.key, first)
            raise InferenceFailed(
                f"model {info.model!r} version {info.version} could not be loaded"
            ) from exc
        config = batch_config(info, engine, self.defaults)
        batcher = Batcher(
            engine.run, config, model=info.model, version=info.version, metrics=self.metrics
        )
        self.metrics.loads.labels(info.model, str(info.version)).inc()
        _LOGGER.info(
            "serving %s:%s on %s (max batch %s, queue delay %.1f ms)",
            info.model, info.version, engine.providers[0], config.max_batch_size,
            config.max_queue_delay_s * 1000,
        )  # fmt: skip
        return Loaded(info, engine, batcher)

    def _evict(self, *, keep: Key) -> list[Loaded]:
        evicted: list[Loaded] = []
        total = sum(e.info.size for e in self._loaded.values())
        for key in list(self._loaded):
            if total <= self.memory_bytes:
                break
            if key == keep:
                continue
            old = self._loaded.pop(key)
            total -= old.info.size
            evicted.append(old)
            self.metrics.evictions.labels(key[0], str(key[1])).inc()
            _LOGGER.info("evicted %s:%s to stay within %d bytes", *key, self.memory_bytes)
        return evicted

    def is_loaded(self, key: Key) -> bool:
        with self._lock:
            return key in self._loaded

    def loaded(self) -> list[Key]:
        """The warm versions, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def oldest_wait_s(self) -> float:
        """The longest any request still queued has waited, over every warm version."""
        with self._lock:
            entries = list(self._loaded.values())
        return max((e.batcher.oldest_wait_s() for e in entries), default=0.0)

    def forget(self, key: Key, entry: Loaded) -> None:
        """Drop ``entry`` if it is still the warm one (its batcher closed under a caller)."""
        with self._lock:
            if self._loaded.get(key) is entry:
                del self._loaded[key]

    def close(self) -> None:
        with self._lock:
            entries = list(self._loaded.values())
            self._loaded.clear()
        for entry in entries:
            entry.batcher.close()
        for entry in entries:
            entry.batcher.join(5)
