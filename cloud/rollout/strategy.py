"""What a rollout is asked to do (its strategy) and the waves that follow from it."""

from __future__ import annotations

import hashlib
import math
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = ["RolloutState", "Strategy", "TargetState", "plan_waves", "stored_strategy"]


class RolloutState(StrEnum):
    IN_PROGRESS = "IN_PROGRESS"
    PAUSED = "PAUSED"
    # Taking every device that took the new version back to its previous one.
    ABORTING = "ABORTING"
    COMPLETED = "COMPLETED"
    ABORTED = "ABORTED"
    SUPERSEDED = "SUPERSEDED"

    @property
    def finished(self) -> bool:
        return self in (RolloutState.COMPLETED, RolloutState.ABORTED, RolloutState.SUPERSEDED)


class TargetState(StrEnum):
    PENDING = "PENDING"  # its wave has not reached it
    DEPLOYING = "DEPLOYING"  # told to run the new version; waiting for ACTIVE
    ACTIVE = "ACTIVE"  # health-checked and serving the new version
    REMOVED = "REMOVED"  # an undeploy's success: the device confirmed the model is unloaded
    FAILED = "FAILED"  # reported FAILED, or timed out
    REVERTING = "REVERTING"  # told to go back to its previous version
    REVERTED = "REVERTED"  # serving its previous version again (confirmed)
    REVERT_FAILED = "REVERT_FAILED"  # did not confirm the way back in time
    SKIPPED = "SKIPPED"  # never reached: the rollout ended first


class Strategy(BaseModel):
    """Canary, then waves growing by ``growth``. A wave is done when ``success_threshold`` of
    it is ACTIVE; the rollout aborts once ``min_failures`` devices failed and they are at
    least ``failure_threshold`` of those that finished. A device that does not finish within
    ``device_timeout_s`` has failed."""

    model_config = ConfigDict(extra="forbid")

    canary: int | None = Field(default=1, ge=1, le=100_000, description="canary devices")
    canary_percent: float | None = Field(
        default=None, gt=0, le=100, description="canary as a share of the targets (instead)"
    )
    growth: float = Field(default=2.0, ge=1.0, le=1000)
    success_threshold: float = Field(default=1.0, gt=0, le=1)
    failure_threshold: float = Field(default=0.2, gt=0, le=1)
    min_failures: int = Field(default=1, ge=1, le=100_000)
    device_timeout_s: float = Field(default=600.0, gt=0, le=7 * 86400)
    max_devices_per_minute: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_canary(self) -> Strategy:
        if self.canary_percent is not None:
            self.canary = None
        if self.canary is None and self.canary_percent is None:
            raise ValueError("give canary (devices) or canary_percent")
        return self

    def canary_size(self, total: int) -> int:
        if self.canary_percent is not None:
            return max(1, math.ceil(total * self.canary_percent / 100))
        return min(total, self.canary or 1)


def stored_strategy(stored: object) -> tuple[Strategy, str | None]:
    """A rollout's strategy as stored, and None; or, when it no longer validates (stored by a
    release with a field since removed, a bound since tightened), what of it still does (the
    defaults at worst) and why not: shown as such, and enough for an abort's timeouts."""
    try:
        return Strategy.model_validate(stored), None
    except ValidationError as exc:
        problem = "strategy invalid: " + "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'strategy'}: {e['msg']}" for e in exc.errors()
        )
    known = (
        {k: v for k, v in stored.items() if k in Strategy.model_fields}
        if isinstance(stored, dict)
        else {}
    )
    try:
        return Strategy.model_validate(known), problem
    except ValidationError:
        return Strategy(), problem


def plan_waves(rollout_id: int, device_ids: list[str], strategy: Strategy) -> dict[str, int]:
    """Each device's wave: the canary first, then waves ``growth`` times the one before.

    The order is a hash of (rollout, device): stable, spread over the fleet (not the
    alphabetically first devices every time), and the same whoever computes it."""
    ordered = sorted(
        device_ids,
        key=lambda d: hashlib.blake2b(f"{rollout_id}:{d}".encode(), digest_size=8).digest(),
    )
    waves: dict[str, int] = {}
    size, start, wave = strategy.canary_size(len(ordered)), 0, 0
    while start < len(ordered):
        for device_id in ordered[start : start + size]:
            waves[device_id] = wave
        start += size
        wave += 1
        size = max(1, math.ceil(size * strategy.growth))
    return waves
