"""One replica's budget loop on the real (embedded) Redis: replicas whose clocks disagree
still agree on who is saturated, a publication that failed is tried again, a broker that lost
the retained budget gets it again, and a replica that stops leaves no say behind.

No inference service runs: the loop reads an idle service's metrics (nothing queued); a
replica's saturation is what its detector was shown before."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from cloud.context import CloudContext
from cloud.inference.backpressure import BackpressureConfig, Change, Sample
from cloud.inference.batcher import BatchConfig
from cloud.inference.budget import BudgetLoop
from cloud.inference.budget_store import STATE_KEY, BudgetStore
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine
from cloud.inference.metrics import InferenceMetrics
from cloud.inference.pool import SessionPool

CONFIG = BackpressureConfig(queue_bound_s=0.1, hold_s=2.0, relax_s=5.0, ttl_s=30.0, floor=0.01)


def _no_engine(info: VersionInfo) -> Engine:
    raise AssertionError(f"nothing is served here, yet {info} was opened")


def budget_loop(
    context: CloudContext,
    replica: str,
    *,
    publish: Callable[[bytes], bool] = lambda _payload: True,
    clock: Callable[[], float] = time.time,
) -> BudgetLoop:
    metrics = InferenceMetrics()
    pool = SessionPool(
        _no_engine,
        memory_bytes=1 << 20,
        defaults=BatchConfig(max_batch_size=1, max_queue_delay_s=0.0, max_queue=8,
                             queue_timeout_s=1.0),
        metrics=metrics,
    )  # fmt: skip
    store = BudgetStore(context.redis, replica=replica, replica_ttl_s=2.0)
    return BudgetLoop(
        metrics=metrics, pool=pool, store=store, publish=publish, config=CONFIG,
        interval_s=0.1, clock=clock,
    )  # fmt: skip


def saturate(loop: BudgetLoop, clock: Callable[[], float] = time.time) -> None:
    """Show ``loop``'s detector a queue 400 ms deep for the last 2.5 s of its clock."""
    now = clock()
    for k in range(6):
        loop.detector.observe(Sample(now - 2.5 + 0.5 * k, 0.4, 0.4, 10, 10, 0))
    assert loop.detector.saturated


def hold(context: CloudContext, share: float, *, changed_s_ago: float) -> None:
    """A budget in Redis, as a replica left it ``changed_s_ago`` (Redis runs on this host)."""
    now = time.time()
    state = {
        "max_offload": share, "reason": "held", "until": now + CONFIG.ttl_s,
        "since": now - changed_s_ago, "changed_at": now - changed_s_ago,
    }  # fmt: skip
    context.redis.set(STATE_KEY, json.dumps(state))


def test_replicas_whose_clocks_disagree_still_agree_on_who_is_saturated(
    context: CloudContext,
) -> None:
    """B's clock is right, A's runs 3 s ahead: more than a saturated mark lives (2 s). B is
    saturated and holds the budget at the floor; A is clear, and must not relax it."""
    hold(context, CONFIG.floor, changed_s_ago=60.0)
    ahead: Callable[[], float] = lambda: time.time() + 3.0  # noqa: E731
    a = budget_loop(context, "a", clock=ahead)
    b = budget_loop(context, "b")
    saturate(b)
    assert b.tick() is not None
    decision = a.tick()
    assert decision is not None
    assert decision.change is Change.NONE, decision
    assert b.store.read() == decision.state


def test_a_budget_with_an_infinite_time_in_redis_does_not_stop_the_loop(
    context: CloudContext,
) -> None:
    """Something wrote ``until: Infinity`` (and a recent change, so nobody relaxes it): no
    device could be told that budget. The loop treats it as none and publishes the empty
    payload (it raised on every look, turning it into a date)."""
    now = time.time()
    state = {"max_offload": 0.5, "reason": "x", "until": float("inf"), "since": now,
             "changed_at": now}  # fmt: skip
    context.redis.set(STATE_KEY, json.dumps(state))
    sent: list[bytes] = []
    loop = budget_loop(context, "a", publish=lambda payload: sent.append(payload) is None)
    decision = loop.tick()
    assert decision is not None
    assert sent == [b""]
