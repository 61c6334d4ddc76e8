"""The offload budget every inference replica shares, in Redis: the budget itself (one key,
changed only by a compare-and-set, so two replicas never overwrite each other's step) and
the replicas saturated now (a sorted set scored by expiry: a replica that dies drops out of
it on its own, and with it its say in the budget). Times passed in are Redis's (:meth:`now`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import redis

from cloud.inference.backpressure import BudgetState, Change, Decision

__all__ = ["SATURATED_KEY", "STATE_KEY", "BudgetStore"]

_LOGGER = logging.getLogger(__name__)

STATE_KEY = "edgefleet:inference:budget"
SATURATED_KEY = "edgefleet:inference:budget:saturated"
_ATTEMPTS = 8

# One replica's step: (the budget now, whether some replica is saturated) -> its decision.
Step = Callable[[BudgetState | None, bool], Decision]


# The latest time a datetime holds (9999-12-31, UTC): what devices are told must be one.
_LAST_TIME = 253_402_300_799.0


def _load(raw: object) -> BudgetState | None:
    if not isinstance(raw, bytes | str):
        return None
    try:
        fields = json.loads(raw)
        state = BudgetState(
            max_offload=float(fields["max_offload"]),
            reason=str(fields["reason"]),
            until=float(fields["until"]),
            since=float(fields["since"]),
            changed_at=float(fields["changed_at"]),
        )
        times = (state.until, state.since, state.changed_at)
        # json reads Infinity and NaN: a budget no device could be told is no budget.
        if not 0.0 <= state.max_offload <= 1.0 or not all(0 <= t <= _LAST_TIME for t in times):
            raise ValueError("a share outside [0, 1], or a time no clock can show")
        return state
    except (ValueError, KeyError, TypeError):
        # Written by something else (or a newer version we cannot read): as if none.
        _LOGGER.warning("budget in Redis (%s) unreadable; treated as none", STATE_KEY)
        return None


def _dump(state: BudgetState) -> str:
    return json.dumps(
        {
            "max_offload": state.max_offload,
            "reason": state.reason,
            "until": state.until,
            "since": state.since,
            "changed_at": state.changed_at,
        }
    )


class BudgetStore:
    def __init__(self, client: redis.Redis, *, replica: str, replica_ttl_s: float) -> None:
        self.client = client
        self.replica = replica
        self.replica_ttl_s = replica_ttl_s

    def now(self) -> float:
        """Redis's clock (epoch seconds). Marks, their expiry and the budget's times are all
        on it: replicas whose own clocks disagree (by more than a mark lives) would each
        prune the others' marks, or keep them too long."""
        seconds, micros = self.client.time()
        return seconds + micros / 1e6

    def read(self) -> BudgetState | None:
        return _load(self.client.get(STATE_KEY))

    def saturated(self, now: float) -> list[str]:
        """The replicas that said they are saturated and have not expired since."""
        members = self.client.zrangebyscore(SATURATED_KEY, now, "+inf")
        return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def mark(self, saturated: bool, now: float) -> None:
        """Say whether this replica is saturated (it stays so for ``replica_ttl_s`` unless
        said again), and drop the entries of replicas that stopped saying so."""
        pipe = self.client.pipeline(transaction=False)
        if saturated:
            pipe.zadd(SATURATED_KEY, {self.replica: now + self.replica_ttl_s})
        else:
            pipe.zrem(SATURATED_KEY, self.replica)
        pipe.zremrangebyscore(SATURATED_KEY, "-inf", f"({now}")
        pipe.expire(SATURATED_KEY, max(1, int(self.replica_ttl_s * 4)))
        pipe.execute()

    def apply(self, step: Step, now: float) -> Decision:
        """Run ``step`` on the current budget and write what it decides, atomically: if
        another replica changed the budget (or who is saturated) meanwhile, run it again on
        what that replica wrote."""
        state: BudgetState | None = None
        for _ in range(_ATTEMPTS):
            with self.client.pipeline() as pipe:
                try:
                    pipe.watch(STATE_KEY, SATURATED_KEY)  # type: ignore[no-untyped-call]
                    state = _load(pipe.get(STATE_KEY))
                    someone = int(pipe.zcount(SATURATED_KEY, now, "+inf")) > 0
                    decision = step(state, someone)
                    if decision.change is Change.NONE:
                        pipe.unwatch()
                        return decision
                    pipe.multi()
                    if decision.state is None:
                        pipe.delete(STATE_KEY)
                    else:
                        # Kept a TTL past its expiry, so a replica still clears what is left
                        # on the broker; then gone, whoever died.
                        ttl_ms = int((decision.state.until - now) * 2000) + 1000
                        pipe.set(STATE_KEY, _dump(decision.state), px=max(ttl_ms, 1000))
                    pipe.execute()
                    return decision
                except redis.WatchError:
                    continue
        _LOGGER.warning("budget: %d replicas' steps in a row got in the way; next tick", _ATTEMPTS)
        return Decision(Change.NONE, state)
