"""Backoff with full jitter."""

from __future__ import annotations

import random

import pytest

from shared.retry import Backoff, retry


def test_delays_stay_under_a_growing_capped_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    for attempt in range(200):
        assert 0.0 <= backoff.delay(attempt) <= min(8.0, 0.5 * 2**attempt)
    assert backoff.ceiling(1000) == 8.0


def test_jitter_spreads_a_crowd_of_clients() -> None:
    """1,000 clients at their 5th attempt do not retry at the same instant."""
    delays = [Backoff(base=1.0, cap=60.0).delay(5) for _ in range(1000)]
    buckets = {int(d) for d in delays}
    assert len(buckets) > 25
    assert max(delays) <= 32.0


def test_retry_returns_after_transient_failures_and_sleeps_between() -> None:
    calls, sleeps = [], []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "up"

    assert retry(flaky, attempts=5, retry_on=(ConnectionError,), sleep=sleeps.append) == "up"
    assert len(calls) == 3
    assert len(sleeps) == 2


def test_retry_gives_up_with_the_last_error_and_ignores_others() -> None:
    with pytest.raises(ConnectionError):
        retry(
            lambda: (_ for _ in ()).throw(ConnectionError("x")),
            attempts=2,
            retry_on=(ConnectionError,),
            sleep=lambda _s: None,
        )
    with pytest.raises(KeyError):
        retry(lambda: {}["k"], attempts=3, retry_on=(ConnectionError,), sleep=lambda _s: None)
