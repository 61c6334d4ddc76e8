"""What the fleet service watches about itself: its ingest backlog and the broker's drops."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BROKER_STATS", "BacklogWatch", "BrokerWatch", "Throttle"]

_LOGGER = logging.getLogger(__name__)

# Mosquitto's $SYS counters (published every sys_interval, 10 s by default, and retained):
# messages it dropped (queue limits, QoS 0 to a full client), and what it holds for clients.
BROKER_STATS = {
    "$SYS/broker/publish/messages/dropped": "dropped",
    "$SYS/broker/store/messages/count": "stored",
    "$SYS/broker/clients/connected": "clients",
}


class Throttle:
    """At most one log line per key per ``interval_s``; the lines held back are counted."""

    def __init__(self, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None to stay quiet; else how many lines were held back since the last one."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)


@dataclass
class BacklogWatch:
    """Warns while the ingest backlog is high or old, and once when it has cleared."""

    capacity: int
    warn_fraction: float = 0.5
    warn_age_s: float = 5.0
    repeat_s: float = 30.0
    clock: Callable[[], float] = time.monotonic
    warnings: int = 0
    _high_since: float | None = None
    _last_warned: float = field(default=-1e18)

    def check(self, depth: int, oldest_age_s: float) -> None:
        high = depth >= self.capacity * self.warn_fraction or oldest_age_s >= self.warn_age_s
        now = self.clock()
        if not high:
            if self._high_since is not None:
                _LOGGER.info(
                    "ingest backlog cleared after %.0f s (%d queued)", now - self._high_since, depth
                )
                self._high_since = None
            return
        if self._high_since is None:
            self._high_since = now
        if now - self._last_warned >= self.repeat_s:
            self._last_warned = now
            self.warnings += 1
            _LOGGER.warning(
                "ingest backlog: %d of %d queued, oldest %.1f s: the database is slower than "
                "the fleet; the broker holds the rest (unacknowledged) up to its queue limits",
                depth, self.capacity, oldest_age_s,
            )  # fmt: skip


@dataclass
class BrokerWatch:
    """Reads the broker's $SYS counters; a growing drop counter is a loud warning."""

    values: dict[str, int] = field(default_factory=dict)
    dropped_seen: int = 0
    warnings: int = 0
    _baseline: int | None = None

    def on_stat(self, topic: str, payload: bytes) -> None:
        name = BROKER_STATS.get(topic)
        if name is None:
            return
        try:
            value = int(payload.decode().split()[0])
        except (UnicodeDecodeError, ValueError, IndexError):
            return
        self.values[name] = value
        if name == "dropped":
            self._on_dropped(value)

    def _on_dropped(self, total: int) -> None:
        if self._baseline is None or total < self._baseline:
            # First reading (or a restarted broker): what it dropped before we watched.
            if total and self._baseline is None:
                _LOGGER.warning("the broker has dropped %d messages since it started", total)
            self._baseline = total
            return
        grown = total - self._baseline
        if grown > 0:
            self.dropped_seen += grown
            self.warnings += 1
            _LOGGER.warning(
                "the broker dropped %d messages (%d since it started): a client's queue is "
                "full (max_queued_messages/bytes); devices' reports may be lost",
                grown, total,
            )  # fmt: skip
        self._baseline = total
