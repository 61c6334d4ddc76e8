"""Several inference replicas share one budget through the real (embedded) Redis: they do
not fight over it, a saturated replica holds it down, and a dead one stops counting once its
mark expires."""

from __future__ import annotations

import json
import threading

import pytest
import redis

from cloud.context import CloudContext
from cloud.inference.backpressure import BackpressureConfig, BudgetState, Change, Decision, decide
from cloud.inference.budget_store import STATE_KEY, BudgetStore, Step

CONFIG = BackpressureConfig(queue_bound_s=0.1, hold_s=2.0, relax_s=5.0, ttl_s=30.0)
NOW = 1_900_000_000.0


def step_for(saturated: bool, now: float, cut: float = 0.5) -> Step:
    """One replica's look at ``now``: saturated or not, cutting by ``cut``."""

    def step(state: BudgetState | None, someone: bool) -> Decision:
        return decide(
            state, saturated=saturated, cut=cut, reason="test", any_saturated=someone or saturated,
            now=now, config=CONFIG,
        )  # fmt: skip

    return step


def test_two_saturated_replicas_cut_once_per_hold_time_not_once_each(
    context: CloudContext,
) -> None:
    """Both replicas are saturated and look at the same moment, on threads of their own: one
    cut (to 0.5) lands, the other replica's step runs again on it and finds it too recent."""
    a = BudgetStore(context.redis, replica="a", replica_ttl_s=3)
    b = BudgetStore(context.redis, replica="b", replica_ttl_s=3)
    a.mark(True, NOW)
    b.mark(True, NOW)
    decisions: list[Decision] = []
    barrier = threading.Barrier(2)

    def look(store: BudgetStore) -> None:
        barrier.wait()
        decisions.append(store.apply(step_for(True, NOW), NOW))

    threads = [threading.Thread(target=look, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.change for d in decisions) == [Change.NONE, Change.TIGHTEN]
    state = a.read()
    assert state is not None
    assert state.max_offload == 0.5
    assert a.saturated(NOW) == ["a", "b"]
    later = a.apply(step_for(True, NOW + 2.0), NOW + 2.0)
    assert (later.change, b.read()) == (Change.TIGHTEN, later.state)
    assert later.state is not None
    assert later.state.max_offload == 0.25


def test_a_budget_relaxes_only_once_no_replica_is_saturated_and_a_dead_one_drops_out(
    context: CloudContext,
) -> None:
    """Replica a cut the budget and died (it never says it is clear); b is clear. b does not
    relax while a's mark lives, and does once it expired."""
    a = BudgetStore(context.redis, replica="a", replica_ttl_s=10)
    b = BudgetStore(context.redis, replica="b", replica_ttl_s=10)
    a.mark(True, NOW)
    assert a.apply(step_for(True, NOW, cut=0.25), NOW).change is Change.TIGHTEN
    b.mark(False, NOW + 6)  # past relax_s, but a's mark lives until NOW + 10
    assert b.saturated(NOW + 6) == ["a"]
    assert b.apply(step_for(False, NOW + 6), NOW + 6).change is Change.NONE
    b.mark(False, NOW + 10.5)
    assert b.saturated(NOW + 10.5) == []
    relaxed = b.apply(step_for(False, NOW + 10.5), NOW + 10.5)
    assert relaxed.change is Change.RELAX
    assert relaxed.state is not None
    assert relaxed.state.max_offload == 0.5
    assert a.read() == relaxed.state
    assert b.apply(step_for(False, NOW + 16), NOW + 16).change is Change.CLEAR
    assert b.read() is None
    assert context.redis.exists(STATE_KEY) == 0


def test_an_unreadable_budget_in_redis_is_treated_as_none(context: CloudContext) -> None:
    store = BudgetStore(context.redis, replica="a", replica_ttl_s=3)
    context.redis.set(STATE_KEY, b"{not json")
    assert store.read() is None
    assert store.apply(step_for(True, NOW), NOW).change is Change.TIGHTEN


@pytest.mark.parametrize(
    "fields",
    [
        {"until": float("inf")},
        {"since": float("nan")},
        {"changed_at": float("-inf")},
        {"until": 1e300},  # past year 9999: no datetime for the devices
        {"max_offload": float("nan")},
        {"max_offload": 1.5},
        {"max_offload": -0.1},
    ],
)
def test_a_budget_no_device_could_be_told_is_unreadable(
    context: CloudContext, fields: dict[str, float]
) -> None:
    """Not a share in [0, 1], or a time that is not finite or no datetime can hold: treated
    as none, and the next saturated replica starts a budget of its own over it."""
    state = {"max_offload": 0.5, "reason": "x", "until": NOW + 30, "since": NOW, "changed_at": NOW}
    context.redis.set(STATE_KEY, json.dumps({**state, **fields}))
    store = BudgetStore(context.redis, replica="a", replica_ttl_s=3)
    assert store.read() is None
    assert store.apply(step_for(True, NOW), NOW).change is Change.TIGHTEN


def test_redis_down_is_an_error_the_loop_can_catch() -> None:
    """Nothing listens there: the store raises RedisError (the loop logs and skips a look)."""
    client = redis.Redis.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.5)
    store = BudgetStore(client, replica="a", replica_ttl_s=3)
    try:
        with pytest.raises(redis.RedisError):
            store.mark(True, NOW)
        with pytest.raises(redis.RedisError):
            store.apply(step_for(True, NOW), NOW)
    finally:
        client.close()
