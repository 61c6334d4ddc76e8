"""The backpressure controller as a pure unit: queue-time samples in, budget steps out.

One sample every 0.5 s; bound 100 ms, hold 2 s, relax 5 s, TTL 30 s, floor 0.01."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from cloud.inference.backpressure import (
    BackpressureConfig,
    BudgetState,
    Change,
    Sample,
    SaturationDetector,
    decide,
)

CONFIG = BackpressureConfig(queue_bound_s=0.1, hold_s=2.0, relax_s=5.0, ttl_s=30.0, floor=0.01)
STEP_S = 0.5


@dataclass
class Replica:
    """One replica fed samples, deciding on a budget it shares with ``others_saturated``."""

    detector: SaturationDetector = field(default_factory=lambda: SaturationDetector(CONFIG))
    state: BudgetState | None = None
    now: float = 1000.0
    others_saturated: bool = False
    steps: list[tuple[float, Change, float | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Where the loop starts: a first look at a quiet service.
        self.detector.observe(Sample(self.now, 0.0, 0.0, 0, 0, 0))

    def feed(
        self,
        seconds: float,
        *,
        wait_ms: float = 0.0,
        arrived: int = 50,
        served: int | None = None,
        rejected: int = 0,
    ) -> None:
        for _ in range(round(seconds / STEP_S)):
            self.now += STEP_S
            sample = Sample(
                at=self.now, queue_s=wait_ms / 1000, oldest_s=0.0, arrived=arrived,
                served=arrived if served is None else served, rejected=rejected,
            )  # fmt: skip
            saturated = self.detector.observe(sample)
            since = None if self.state is None else self.state.changed_at
            decision = decide(
                self.state,
                saturated=saturated,
                cut=self.detector.cut(since),
                reason=self.detector.reason(),
                any_saturated=saturated or self.others_saturated,
                now=self.now,
                config=CONFIG,
            )
            self.state = decision.state
            if decision.change is not Change.NONE:
                share = None if decision.state is None else decision.state.max_offload
                self.steps.append((self.now, decision.change, share))

    def changes(self) -> list[tuple[Change, float | None]]:
        return [(c, None if s is None else round(s, 4)) for _t, c, s in self.steps]


def test_a_spike_shorter_than_the_hold_time_publishes_nothing() -> None:
    replica = Replica()
    for _ in range(5):
        replica.feed(1.5, wait_ms=400)  # past the bound, but never for 2 s in a row
        replica.feed(0.5, wait_ms=10)
    assert not replica.detector.saturated
    assert replica.steps == []


def test_a_queue_that_stays_past_the_bound_cuts_by_bound_over_wait_every_hold_time() -> None:
    """400 ms against a 100 ms bound, clients that wait for their answers (served equals
    arrived): a quarter, then a quarter of that, each after another 2 s, down to the floor."""
    replica = Replica()
    replica.feed(1.5, wait_ms=400)
    assert replica.steps == []
    replica.feed(0.5, wait_ms=400)
    assert replica.changes() == [(Change.TIGHTEN, 0.25)]
    assert replica.state is not None
    assert "400 ms" in replica.state.reason
    replica.feed(1.5, wait_ms=400)
    assert len(replica.steps) == 1  # not before hold_s since the last cut
    replica.feed(6.5, wait_ms=400)
    assert replica.changes() == [
        (Change.TIGHTEN, 0.25),
        (Change.TIGHTEN, 0.0625),
        (Change.TIGHTEN, 0.0156),
        (Change.TIGHTEN, 0.01),
    ]
    times = [t for t, _c, _s in replica.steps]
    assert [round(b - a, 1) for a, b in itertools.pairwise(times)] == [2.0, 2.0, 2.0]


def test_no_second_cut_once_the_queue_drained_after_the_first() -> None:
    """The first cut worked: within a second the queue is empty. The replica is still
    saturated (hysteresis: clear only after 2 s under half the bound), and the 400 ms of
    before the cut are still within its last 2 s; neither is a reason to cut again: only
    what the queue did after the cut counts. It clears, and the budget relaxes."""
    replica = Replica()
    replica.feed(2.0, wait_ms=400)
    assert replica.changes() == [(Change.TIGHTEN, 0.25)]
    replica.feed(0.5, wait_ms=200)
    replica.feed(1.5, wait_ms=0)
    assert replica.detector.saturated
    assert replica.changes() == [(Change.TIGHTEN, 0.25)]
    replica.feed(5.0, wait_ms=0)
    assert replica.changes() == [(Change.TIGHTEN, 0.25), (Change.RELAX, 0.5)]


@dataclass
class OpenLoop:
    """A fluid model of one replica and a fleet that does not wait for its answers: devices
    see ``offered`` rows/s and offload ``natural`` of them, or the budget if lower, at once;
    the cloud serves ``capacity`` requests/s in order; the rest waits in its queue."""

    offered: float
    natural: float
    capacity: float
    replica: Replica = field(default_factory=Replica)
    queue: float = 0.0
    served_total: float = 0.0
    _carried: tuple[float, float] = (0.0, 0.0)

    def run(self, seconds: float) -> list[float]:
        """The share in force after each look."""
        shares = []
        for _ in range(round(seconds / STEP_S)):
            state = self.replica.state
            share = self.natural if state is None else min(self.natural, state.max_offload)
            arriving = self.offered * share * STEP_S
            served = min(self.capacity * STEP_S, self.queue + arriving)
            self.queue += arriving - served
            self.served_total += served
            # Whole requests per sample, the fractions carried to the next.
            arrived, done = self._carried[0] + arriving, self._carried[1] + served
            self._carried = (arrived - int(arrived), done - int(done))
            wait_ms = 1000 * self.queue / self.capacity
            self.replica.feed(STEP_S, wait_ms=wait_ms, arrived=int(arrived), served=int(done))
            state = self.replica.state
            shares.append(1.0 if state is None else state.max_offload)
        return shares


@pytest.mark.parametrize(
    ("offered", "natural", "capacity"),
    [(200.0, 0.3, 20.0), (200.0, 0.3, 40.0), (400.0, 0.3, 20.0), (100.0, 0.5, 20.0)],
)
def test_against_a_fleet_that_does_not_wait_the_budget_settles_near_what_the_cloud_serves(
    offered: float, natural: float, capacity: float
) -> None:
    """The cloud serves ``capacity`` of the ``offered`` x ``natural`` requests/s it gets: the
    budget it needs is capacity / offered. After a minute the budget stays near that: it
    probes above (a relax doubles it) and steps back, at worst by the deepest cut, a quarter,
    to about half of it, never down to the floor; and the cloud serves most of what it can
    rather than idling."""
    fleet = OpenLoop(offered, natural, capacity)
    fleet.run(60.0)
    served_before = fleet.served_total
    shares = fleet.run(240.0)
    needed = capacity / offered
    assert needed / 2.5 <= min(shares), (needed, min(shares))
    assert max(shares) <= 2 * needed, (needed, max(shares))
    assert (fleet.served_total - served_before) / (capacity * 240.0) > 0.75


def test_refusals_saturate_even_a_short_queue_and_the_cut_is_what_was_served() -> None:
    """Queue full: 503s, and of 100 arrivals 60 served; the queue itself is short."""
    replica = Replica()
    replica.feed(2.0, wait_ms=20, arrived=100, served=60, rejected=40)
    assert replica.changes() == [(Change.TIGHTEN, 0.6)]
    assert replica.state is not None
    assert "refused as overloaded" in replica.state.reason


def test_a_mild_overload_still_cuts_by_at_least_a_tenth() -> None:
    replica = Replica()
    replica.feed(2.0, wait_ms=105)
    assert replica.changes() == [(Change.TIGHTEN, 0.9)]


def test_between_half_the_bound_and_the_bound_a_saturated_replica_stays_saturated() -> None:
    """Hysteresis: once saturated, 70 ms (under the bound) is not clear yet; 40 ms is, after
    the hold time."""
    replica = Replica()
    replica.feed(2.0, wait_ms=400)
    replica.feed(10.0, wait_ms=70)
    assert replica.detector.saturated
    replica.feed(1.5, wait_ms=40)
    assert replica.detector.saturated
    replica.feed(0.5, wait_ms=40)
    assert not replica.detector.saturated


def test_once_clear_the_budget_relaxes_step_by_step_then_clears() -> None:
    replica = Replica()
    replica.feed(4.0, wait_ms=400)  # 0.25, then 0.0625
    replica.feed(2.0, wait_ms=10)  # clear after the hold time
    assert not replica.detector.saturated
    replica.feed(30.0, wait_ms=10)
    assert replica.changes() == [
        (Change.TIGHTEN, 0.25),
        (Change.TIGHTEN, 0.0625),
        (Change.RELAX, 0.125),
        (Change.RELAX, 0.25),
        (Change.RELAX, 0.5),
        (Change.CLEAR, None),
    ]
    relaxed = [t for t, c, _s in replica.steps if c is not Change.TIGHTEN]
    assert [round(b - a, 1) for a, b in itertools.pairwise(relaxed)] == [5.0] * 3
    assert replica.state is None


def test_the_budget_does_not_relax_while_another_replica_is_saturated() -> None:
    replica = Replica()
    replica.feed(2.0, wait_ms=400)
    replica.others_saturated = True
    replica.feed(20.0, wait_ms=10)
    assert [c for c, _s in replica.changes()] == [Change.TIGHTEN, Change.RENEW]
    assert replica.state is not None
    assert replica.state.max_offload == 0.25
    replica.others_saturated = False  # that replica recovered, or died and dropped out
    replica.feed(5.0, wait_ms=10)
    assert replica.changes()[-1] == (Change.RELAX, 0.5)


def test_a_budget_held_without_a_change_is_renewed_before_it_expires() -> None:
    """Another replica stays saturated, this one is clear: nobody moves the budget, and it
    is renewed every half TTL (15 s) so the devices keep following it."""
    replica = Replica()
    replica.feed(2.0, wait_ms=400)
    replica.others_saturated = True
    replica.feed(60.0, wait_ms=0)
    renewals = [t for t, c, _s in replica.steps if c is Change.RENEW]
    # At the first look with less than half the TTL left.
    assert [round(b - a, 1) for a, b in itertools.pairwise(renewals)] == [15.5] * 2
    assert replica.state is not None
    assert replica.state.max_offload == 0.25
    assert replica.state.until - replica.now > CONFIG.ttl_s / 2


@pytest.mark.parametrize(("saturated", "change"), [(False, Change.CLEAR), (True, Change.TIGHTEN)])
def test_a_budget_nobody_renewed_is_cleared_or_started_again(
    saturated: bool, change: Change
) -> None:
    """Every replica died and one came back after the budget expired: it clears what the
    broker may still hold, or, saturated itself, starts a new episode."""
    stale = BudgetState(max_offload=0.1, reason="old", until=990.0, since=900.0, changed_at=960.0)
    decision = decide(
        stale, saturated=saturated, cut=0.5, reason="now", any_saturated=saturated,
        now=1000.0, config=CONFIG,
    )  # fmt: skip
    assert decision.change is change
    if saturated:
        assert decision.state is not None
        assert (decision.state.max_offload, decision.state.since) == (0.5, 1000.0)
    else:
        assert decision.state is None


def test_a_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        BackpressureConfig(queue_bound_s=0)
    with pytest.raises(ValueError, match="floor"):
        BackpressureConfig(floor=1.0)
