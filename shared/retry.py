"""Exponential backoff with full jitter, so a fleet that reconnects does not stampede."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

__all__ = ["Backoff", "retry"]

T = TypeVar("T")


@dataclass(slots=True)
class Backoff:
    """Full jitter: the n-th delay is uniform in [0, min(cap, base * factor**n)].

    See "Exponential Backoff And Jitter" (AWS architecture blog): full jitter spreads a
    crowd of clients best for the least total work.
    """

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)

    def ceiling(self, attempt: int) -> float:
        # Cap the exponent so a long outage cannot overflow the float.
        return float(min(self.cap, self.base * self.factor ** min(attempt, 64)))

    def delay(self, attempt: int) -> float:
        return self.rng.uniform(0.0, self.ceiling(attempt))


def retry(
    fn: Callable[[], T],
    *,
    attempts: int,
    retry_on: tuple[type[BaseException], ...],
    backoff: Backoff | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` up to ``attempts`` times, sleeping a jittered delay between failures."""
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    backoff = backoff or Backoff()
    for attempt in range(attempts):
        try:
            return fn()
        except retry_on:
            if attempt == attempts - 1:
                raise
            sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover
