"""Counters and a latency histogram since the last report, the process's resource use, and
the outbox that keeps the windows a disconnected agent could not send."""

from __future__ import annotations

import bisect
import os
import resource
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime

from shared.messages import BudgetReport, Histogram, Telemetry

__all__ = ["LATENCY_BOUNDS_MS", "Meter", "Outbox", "rss_bytes"]

LATENCY_BOUNDS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def rss_bytes() -> int:
    """Current resident memory (Linux /proc; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Meter:
    """Thread-safe; ``snapshot()`` returns the window's telemetry and starts a new window.

    Lifetime totals are kept too, for the local /metrics endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.totals: Counter[str] = Counter()
        self.total_buckets = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self._since = time.monotonic()
        self._cpu_since = time.process_time()

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n
            self.totals[name] += n

    def observe_ms(self, latency_ms: float) -> None:
        index = bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)
        with self._lock:
            self._buckets[index] += 1
            self.total_buckets[index] += 1

    def snapshot(self, active: dict[str, int], budget: BudgetReport | None = None) -> Telemetry:
        with self._lock:
            now, cpu = time.monotonic(), time.process_time()
            window = max(now - self._since, 1e-6)
            cpu_percent = 100.0 * (cpu - self._cpu_since) / window
            counts, buckets = dict(self._counts), list(self._buckets)
            self._counts.clear()
            self._buckets = [0] * len(buckets)
            self._since, self._cpu_since = now, cpu
        return Telemetry(
            window_s=window,
            counts=counts,
            latency_ms=Histogram(bounds=LATENCY_BOUNDS_MS, counts=buckets),
            active=active,
            cpu_percent=max(cpu_percent, 0.0),
            rss_bytes=rss_bytes(),
            at=datetime.now(UTC),
            budget=budget,
        )


class Outbox:
    """Telemetry windows not sent yet, oldest first; bounded, the oldest dropped when full.

    A window is taken off only once ``send`` accepted it, so a publish refused while the
    link is down keeps it (and everything after it) for the next flush, in order."""

    def __init__(self, limit: int, *, on_drop: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("an outbox holds at least one window")
        self.limit = limit
        self.dropped = 0
        self._on_drop = on_drop
        self._pending: deque[bytes] = deque()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, payload: bytes) -> None:
        with self._lock:
            self._pending.append(payload)
            overflow = len(self._pending) - self.limit
            for _ in range(overflow):
                self._pending.popleft()
            self.dropped += max(overflow, 0)
        if overflow > 0 and self._on_drop is not None:
            self._on_drop(overflow)

    def flush(self, send: Callable[[bytes], bool]) -> int:
        """Send windows in order until ``send`` refuses one; returns how many went out."""
        sent = 0
        with self._lock:  # held while sending: two flushes must not interleave the order
            while self._pending:
                if not send(self._pending[0]):
                    break
                self._pending.popleft()
                sent += 1
        return sent
