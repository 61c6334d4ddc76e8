"""The offload budget's decisions, as pure code (no clock, no Redis, no MQTT): when one
replica's queue counts as saturated, and how the shared budget moves from there.

A replica is *saturated* once its queue time (the mean wait of the requests that started
in a sample, or the wait of the oldest one still queued) has stayed past the bound for
``hold_s``, or it refused requests as overloaded; it is clear again once the queue stayed
under half the bound, with no refusal, for ``hold_s``: two thresholds and two hold times,
so a queue hovering at the bound does not flap.

The budget: a saturated replica cuts it, at most once per ``hold_s`` (its agents need that
long to show the effect), judged only on what its queue did since the budget last moved: the
backlog from before a cut says nothing about that cut. No cut when the queue is back under
the bound, or draining fast enough to be under it within ``hold_s`` (by the next look). Else
by what the service can take: when the queue grew or requests were refused (devices that do
not wait for their answers), the rate that serves what was served and drains what is past
the bound within ``hold_s``, as a share of what arrived; when it held steady (clients that
wait for their answers: arrivals follow what was served, and only the queue says how far
over it is), bound ÷ queue time. Between 0.25 and 0.9 per step. Only when no replica is
saturated does it relax, one step per ``relax_s`` (doubling, at least +0.05), and past 1 it
is cleared. It expires ``ttl_s`` after it was last written; replicas renew it at half that.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, replace
from enum import StrEnum

__all__ = [
    "BackpressureConfig",
    "BudgetState",
    "Change",
    "Decision",
    "Sample",
    "SaturationDetector",
    "decide",
]

MAX_CUT = 0.25  # the deepest cut in one step
MIN_CUT = 0.9  # the shallowest: a step that bites at all
RELAX_FACTOR = 2.0
RELAX_STEP = 0.05


@dataclass(frozen=True, slots=True)
class BackpressureConfig:
    queue_bound_s: float = 0.1
    hold_s: float = 2.0
    relax_s: float = 5.0
    ttl_s: float = 30.0
    floor: float = 0.01

    def __post_init__(self) -> None:
        if self.queue_bound_s <= 0 or self.hold_s <= 0 or self.relax_s <= 0:
            raise ValueError("the queue bound and the hold times must be positive")
        if self.ttl_s <= 0 or not 0.0 <= self.floor < 1.0:
            raise ValueError("the TTL must be positive and the floor in [0, 1)")


@dataclass(frozen=True, slots=True)
class Sample:
    """What one replica's service did since the previous sample."""

    at: float
    queue_s: float  # mean wait of the requests that left the queue (0: none did)
    oldest_s: float  # wait of the oldest request still queued (0: none queued)
    arrived: int
    served: int
    rejected: int  # refused as overloaded (503: queue full or waited too long)

    @property
    def wait_s(self) -> float:
        return max(self.queue_s, self.oldest_s)


class SaturationDetector:
    """One replica's view, sample by sample (see the module's docstring)."""

    def __init__(self, config: BackpressureConfig) -> None:
        self.config = config
        self.saturated = False
        self._since: float | None = None  # when the opposite of the current state began
        self._last_at: float | None = None
        # The last hold_s of samples, each with when the time it covers began.
        self._recent: collections.deque[tuple[float, Sample]] = collections.deque()

    def observe(self, sample: Sample) -> bool:
        """Take one sample; whether this replica is saturated now."""
        config = self.config
        # A sample covers the time since the one before it.
        began, self._last_at = self._last_at if self._last_at is not None else sample.at, sample.at
        self._recent.append((began, sample))
        while self._recent and sample.at - self._recent[0][1].at > config.hold_s:
            self._recent.popleft()
        if self.saturated:
            flipping = sample.rejected == 0 and sample.wait_s < config.queue_bound_s / 2
        else:
            flipping = sample.rejected > 0 or sample.wait_s > config.queue_bound_s
        if not flipping:
            self._since = None
            return self.saturated
        if self._since is None:
            self._since = began
        if sample.at - self._since >= config.hold_s:
            self.saturated, self._since = not self.saturated, None
        return self.saturated

    def cut(self, since: float | None = None) -> float:
        """The factor a saturated replica cuts the budget by (1.0: none), from its samples of
        the last ``hold_s`` that came mostly after ``since``, when the budget last moved, on
        this detector's clock (None: there is no budget yet); see the module's docstring."""
        hold_s, bound = self.config.hold_s, self.config.queue_bound_s
        after = [(b, s) for b, s in self._recent if since is None or s.at - since > (s.at - b) / 2]
        if not after:
            return 1.0
        span = max(after[-1][1].at - after[0][0], 1e-9)
        arrived = sum(s.arrived for _b, s in after)
        served = sum(s.served for _b, s in after)
        rejected = sum(s.rejected for _b, s in after)
        wait = after[-1][1].wait_s  # the freshest: the queue as the last step left it
        if rejected == 0 and wait <= bound:
            return 1.0
        # Requests queued past the bound (served in order: wait x rate), and how many more
        # the queue holds than at the start (< 0: fewer).
        over = max(0.0, wait - bound) * served / span
        grew = arrived - served - rejected
        if rejected == 0 and grew < 0 and over <= -grew / span * hold_s:
            return 1.0
        if (rejected == 0 and abs(grew) <= 1) or arrived <= 0:
            factor = bound / max(wait, bound)
        else:
            factor = (served - over * span / hold_s) / arrived
        return min(MIN_CUT, max(MAX_CUT, factor))

    def reason(self) -> str:
        wait = max((s.wait_s for _b, s in self._recent), default=0.0)
        rejected = sum(s.rejected for _b, s in self._recent)
        said = (
            f"inference queue {wait * 1000:.0f} ms, bound {self.config.queue_bound_s * 1000:g} ms"
        )
        return said + (f", {rejected} refused as overloaded" if rejected else "")


@dataclass(frozen=True, slots=True)
class BudgetState:
    """The budget every replica shares (kept in Redis). Times are epoch seconds."""

    max_offload: float
    reason: str
    until: float
    since: float  # when this episode of saturation began
    changed_at: float  # when the share last moved (a renewal does not count)


class Change(StrEnum):
    NONE = "none"
    TIGHTEN = "tighten"
    RELAX = "relax"
    CLEAR = "clear"
    RENEW = "renew"


@dataclass(frozen=True, slots=True)
class Decision:
    change: Change
    state: BudgetState | None


def decide(
    state: BudgetState | None,
    *,
    saturated: bool,
    cut: float,
    reason: str,
    any_saturated: bool,
    now: float,
    config: BackpressureConfig,
) -> Decision:
    """What one replica does to the shared budget: ``saturated`` and ``cut`` are its own,
    ``any_saturated`` whether some replica (itself included) is saturated now."""
    if state is not None and state.until <= now:
        # Nobody renewed it: the devices stopped following it already; clear what is left.
        stale = decide(
            None, saturated=saturated, cut=cut, reason=reason, any_saturated=any_saturated,
            now=now, config=config,
        )  # fmt: skip
        return stale if stale.change is not Change.NONE else Decision(Change.CLEAR, None)
    if saturated:
        if state is None:
            share = max(config.floor, cut)
            return Decision(
                Change.TIGHTEN, BudgetState(share, reason, now + config.ttl_s, now, now)
            )
        if now - state.changed_at >= config.hold_s:
            share = max(config.floor, state.max_offload * cut)
            if share < state.max_offload:
                return Decision(
                    Change.TIGHTEN,
                    replace(state, max_offload=share, reason=reason, until=now + config.ttl_s,
                            changed_at=now),
                )  # fmt: skip
    elif state is not None and not any_saturated and now - state.changed_at >= config.relax_s:
        share = max(state.max_offload * RELAX_FACTOR, state.max_offload + RELAX_STEP)
        if share >= 1.0 or math.isclose(share, 1.0):
            return Decision(Change.CLEAR, None)
        return Decision(
            Change.RELAX,
            replace(state, max_offload=share, reason="relaxing: no replica saturated",
                    until=now + config.ttl_s, changed_at=now),
        )  # fmt: skip
    if state is not None and state.until - now < config.ttl_s / 2:
        return Decision(Change.RENEW, replace(state, until=now + config.ttl_s))
    return Decision(Change.NONE, state)
