"""The cloud's offload budget on this device: which budget is in force and until when, the
threshold each model follows under it, and the credit that keeps its offload within it.

A model follows a budget when its routing spec has a calibration curve and a threshold: its
threshold becomes the curve's for ``max_offload``, never above the calibrated one (a budget
never makes a device offload more). The curve was measured on the calibration split; a
device whose inputs are harder than that would still offload more than the budget, so each
following model also spends a credit: ``max_offload`` per row seen, one per row offloaded,
the least confident rows first. Models without a curve keep their threshold and are named
in the telemetry report as not following.

How long a budget holds is measured on the device's own clock: from its receipt for
``ttl_s`` when the cloud says so (a device whose clock is off by more than that would find
``until`` past on arrival, or hours away), else until ``until``. A retained budget the broker
delivers again (the same ``issued_at``) extends nothing: a cloud that died leaves the fleet
throttled for ``ttl_s`` at most, however often its devices reconnect.

The router asks on every call: with no budget in force that is one attribute read; with
one, a lock per call (never per row) guards the credit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from shared.errors import EdgeFleetError
from shared.messages import BudgetReport, CloudBudget, RoutingPolicy, RoutingSpec, read_budget
from shared.routing import threshold_for_budget

__all__ = ["MAX_HOLD_S", "BudgetFollower", "Limited", "follows"]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]
Mask = npt.NDArray[np.bool_]

# However far the cloud's ``until`` is, a budget is followed at most this long after it
# arrived unless renewed: a cloud clock far ahead must not throttle the fleet for days.
MAX_HOLD_S = 3600.0
# A budget that looks issued this far in the future says the device's clock is behind.
SKEW_S = 5.0
# Unused credit is kept up to this many rows' worth: a quiet spell does not buy a burst.
BURST_ROWS = 20
_MAX_CACHED_SPECS = 256


def follows(spec: RoutingSpec) -> bool:
    """Whether a model routed by ``spec`` can follow a budget: a score policy with a
    calibrated threshold and the curve to move along."""
    return (
        bool(spec.curve)
        and spec.threshold is not None
        and spec.policy not in (RoutingPolicy.ALWAYS_EDGE, RoutingPolicy.ALWAYS_CLOUD)
    )


def _expiry(budget: CloudBudget, now: float) -> float:
    """When a budget received at ``now`` stops being followed, on the device's clock."""
    if budget.ttl_s is not None:
        return now + min(budget.ttl_s, MAX_HOLD_S)
    return min(budget.until.timestamp(), now + MAX_HOLD_S)


@dataclass(slots=True)
class _InForce:
    budget: CloudBudget
    expires: float  # on the follower's clock (epoch seconds)
    # Bumped when the share changes (not on a renewal): the credit starts again.
    generation: int
    # id(spec) -> (spec, threshold): the curve is read once per spec and budget.
    thresholds: dict[int, tuple[RoutingSpec, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Limited:
    """The router's hard rows under the budget in force; ``kept`` are the rows that would
    have gone to the cloud without it and stay local because of it."""

    hard: Mask
    kept: Mask | None = None


class BudgetFollower:
    """Holds the budget from ``cloud/budget`` (``on_message`` is the MQTT handler)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._in_force: _InForce | None = None
        self._generation = 0
        self._lock = threading.Lock()
        self._credit: dict[str, tuple[int, float]] = {}
        self._issued_at: datetime | None = None  # of the last budget followed
        # How old the last budget looked on arrival, by this clock: clock skew, or a retained
        # budget delivered late (None: the cloud did not say when it issued it).
        self.age_on_arrival_s: float | None = None
        self.received = 0
        self.refused = 0

    # -- the budget --------------------------------------------------------------------------

    def on_message(self, _topic: str, payload: bytes) -> None:
        """A retained budget (or the empty payload that clears it); a malformed one is
        logged, counted and changes nothing."""
        try:
            budget = read_budget(payload)
        except EdgeFleetError as exc:
            self.refused += 1
            _LOGGER.warning("cloud budget ignored: %s", exc.message)
            return
        self.received += 1
        self.set(budget)

    def set(self, budget: CloudBudget | None) -> None:
        now = self.clock()
        with self._lock:
            if budget is not None and budget.issued_at is not None:
                if budget.issued_at == self._issued_at:
                    return  # the retained one, delivered again: it must not extend itself
                self._issued_at = budget.issued_at
                self._age(now - budget.issued_at.timestamp(), budget)
            expires = 0.0 if budget is None else _expiry(budget, now)
            if budget is None or expires <= now:
                if self._in_force is not None:
                    _LOGGER.info("cloud budget cleared: calibrated thresholds again")
                self._in_force = None
                return
            current = self._in_force
            if current is not None and current.budget.max_offload == budget.max_offload:
                # A renewal: same share, later expiry; thresholds and credit stay.
                current.budget, current.expires = budget, expires
                return
            self._generation += 1
            self._in_force = _InForce(budget, expires, self._generation)
        _LOGGER.info(
            "cloud budget: offload at most %.1f%% for %.0f s (%s)",
            budget.max_offload * 100, expires - now, budget.reason or "no reason",
        )  # fmt: skip

    def _age(self, age_s: float, budget: CloudBudget) -> None:
        """Note how old a budget looked on arrival; say so once when that is more than its
        TTL (or it comes from the future), and once when it is back to normal."""
        skewed = age_s < -SKEW_S or age_s > (budget.ttl_s or MAX_HOLD_S)
        was = self.age_on_arrival_s
        was_skewed = was is not None and (was < -SKEW_S or was > (budget.ttl_s or MAX_HOLD_S))
        self.age_on_arrival_s = age_s
        if skewed and not was_skewed:
            _LOGGER.warning(
                "cloud budget issued %.0f s before it arrived, by this device's clock: the "
                "clock is off, or the budget was retained that long; followed for %s",
                age_s, f"{budget.ttl_s:g} s from now" if budget.ttl_s else "until it says",
            )  # fmt: skip
        elif was_skewed and not skewed:
            _LOGGER.info("cloud budget: this device's clock agrees with the cloud's again")

    @property
    def generation(self) -> int:
        """Bumped each time the share in force changes (a renewal does not)."""
        in_force = self._live()
        return 0 if in_force is None else in_force.generation

    def current(self) -> CloudBudget | None:
        """The budget in force now (None: none, or it expired without renewal)."""
        in_force = self._live()
        return None if in_force is None else in_force.budget

    def _live(self) -> _InForce | None:
        in_force = self._in_force
        if in_force is not None and self.clock() >= in_force.expires:
            with self._lock:
                if self._in_force is in_force:
                    self._in_force = None
                    _LOGGER.info("cloud budget expired without renewal: calibrated thresholds")
            return None
        return in_force

    # -- routing -----------------------------------------------------------------------------

    def threshold(self, spec: RoutingSpec) -> float | None:
        """The threshold ``spec`` routes with now (None: it has none)."""
        in_force = self._live()
        if in_force is None or not follows(spec):
            return spec.threshold
        return self._threshold(in_force, spec)

    def _threshold(self, in_force: _InForce, spec: RoutingSpec) -> float:
        cached = in_force.thresholds.get(id(spec))
        if cached is not None and cached[0] is spec:
            return cached[1]
        assert spec.threshold is not None  # follows() checked it
        value = min(spec.threshold, threshold_for_budget(spec.curve, in_force.budget.max_offload))
        if len(in_force.thresholds) >= _MAX_CACHED_SPECS:
            in_force.thresholds.clear()
        in_force.thresholds[id(spec)] = (spec, value)
        return value

    def limit(self, model: str, spec: RoutingSpec, confidence: Array | None, hard: Mask) -> Limited:
        """The rows of one call that go to the cloud under the budget in force: those below
        the budget's threshold, the least confident first while the model's credit lasts."""
        in_force = self._live()
        if in_force is None or confidence is None or not follows(spec):
            return Limited(hard)
        wanted = hard & (confidence < self._threshold(in_force, spec))
        share = in_force.budget.max_offload
        count = int(wanted.sum())
        with self._lock:
            generation, carried = self._credit.get(model, (in_force.generation, 1.0))
            if generation != in_force.generation:
                carried = 1.0  # a new share: one row may go at once, the rest as earned
            available = min(carried, max(1.0, share * BURST_ROWS)) + share * len(hard)
            allowed = min(count, int(available + 1e-9))
            self._credit[model] = (in_force.generation, available - allowed)
        if allowed < count:
            rows = np.flatnonzero(wanted)
            order = np.argsort(confidence[rows], kind="stable")
            wanted = np.zeros_like(hard)
            wanted[rows[order[:allowed]]] = True
        kept = hard & ~wanted
        return Limited(wanted, kept if kept.any() else None)

    # -- reporting ---------------------------------------------------------------------------

    def report(self, specs: Mapping[str, RoutingSpec]) -> BudgetReport | None:
        """The budget in force for a telemetry window, and which models follow it."""
        budget = self.current()
        if budget is None:
            return None
        following = sorted(name for name, spec in specs.items() if follows(spec))
        return BudgetReport(
            max_offload=budget.max_offload,
            reason=budget.reason,
            until=budget.until,
            following=following,
            fixed=sorted(set(specs) - set(following)),
        )

    def prometheus(self, specs: Mapping[str, RoutingSpec]) -> list[str]:
        """Lines for the agent's /metrics: the budget in force and each model's threshold."""
        budget = self.current()
        lines = [
            "# TYPE edgefleet_agent_budget_in_force gauge",
            f"edgefleet_agent_budget_in_force {int(budget is not None)}",
            "# TYPE edgefleet_agent_offload_budget gauge",
            f"edgefleet_agent_offload_budget {1.0 if budget is None else budget.max_offload:.6g}",
            "# TYPE edgefleet_agent_budget_until_seconds gauge",
            f"edgefleet_agent_budget_until_seconds {_epoch(budget.until) if budget else 0}",
            "# TYPE edgefleet_agent_budget_age_on_arrival_seconds gauge",
            f"edgefleet_agent_budget_age_on_arrival_seconds {self.age_on_arrival_s or 0:.6g}",
            "# TYPE edgefleet_agent_budget_following gauge",
        ]
        thresholds = []
        for name, spec in sorted(specs.items()):
            lines.append(
                f'edgefleet_agent_budget_following{{model="{name}"}} '
                f"{int(budget is not None and follows(spec))}"
            )
            threshold = self.threshold(spec)
            if threshold is not None:
                thresholds.append(
                    f'edgefleet_agent_routing_threshold{{model="{name}"}} {threshold:.6g}'
                )
        return [*lines, "# TYPE edgefleet_agent_routing_threshold gauge", *thresholds]


def _epoch(moment: datetime) -> str:
    return f"{moment.timestamp():.3f}"
