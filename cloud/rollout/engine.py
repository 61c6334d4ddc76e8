"""RolloutEngine: while it leads (``Leadership``), each round reads every active rollout,
decides with ``progress.step`` and carries the decision out through fenced writes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cloud.context import CloudContext
from cloud.registry.tables import ModelVersion, Rollout
from cloud.rollout.leader import Leadership
from cloud.rollout.progress import Decision, step
from cloud.rollout.store import (
    ACTIVE_STATES,
    Deposed,
    apply_decision,
    load_targets,
    reports_for,
    revert_target,
    start_target,
)
from cloud.rollout.strategy import RolloutState, Strategy
from shared.errors import Conflict, EdgeFleetError

__all__ = ["RolloutEngine"]

_LOGGER = logging.getLogger(__name__)

# Hands a device's newest desired document to the broker (the keeper's publish).
Publish = Callable[[str], bool]


class RolloutEngine:
    def __init__(
        self,
        context: CloudContext,
        publish: Publish,
        *,
        tick_s: float = 0.5,
        leadership: Leadership | None = None,
    ) -> None:
        self.context = context
        self.publish = publish
        self.tick_s = tick_s
        self.leadership = leadership or Leadership(context.redis)
        self.lifetime = timedelta(seconds=context.settings.desired_lifetime_s)
        self.rounds = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rollout-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.leadership.release()

    def wake(self) -> None:
        """Decide now rather than at the next tick (a rollout was created or commanded)."""
        self._wake.set()

    def tick(self, now: datetime | None = None) -> bool:
        """One round over every active rollout; False when another engine leads."""
        token = self.leadership.hold()
        if token is None:
            return False
        with self.context.database.session() as s:
            ids = s.scalars(
                select(Rollout.id)
                .where(Rollout.state.in_([state.value for state in ACTIVE_STATES]))
                .order_by(Rollout.id)
            ).all()
        for rollout_id in ids:
            if self._stop.is_set():
                break
            try:
                self._advance(rollout_id, token, now or datetime.now(UTC))
            except Deposed as exc:
                _LOGGER.warning("rollout engine deposed: %s", exc.message)
                self.leadership.token = None
                return False
            except Conflict as exc:
                _LOGGER.debug("rollout %s: %s; deciding again next round", rollout_id, exc)
        self.rounds += 1
        return True

    def _advance(self, rollout_id: int, token: int, now: datetime) -> None:
        with self.context.database.session() as s:
            rollout = s.get(Rollout, rollout_id)
            if rollout is None or rollout.model_version_id is None:
                return
            version = s.scalar(
                select(ModelVersion.version).where(ModelVersion.id == rollout.model_version_id)
            )
            assert version is not None
            state, wave = RolloutState(rollout.state), rollout.current_wave
            strategy = Strategy.model_validate(rollout.strategy)
            targets = load_targets(s, rollout)
            reports = reports_for(s, rollout_id)
        decision = step(
            state=state, wave=wave, version=version, strategy=strategy, targets=targets,
            reports=reports, now=now,
        )  # fmt: skip
        if decision.targets or decision.state is not state or decision.wave != wave:
            with self.context.database.session() as s:
                apply_decision(
                    s, rollout_id=rollout_id, token=token, expect=state.value, decision=decision
                )
            if decision.state is not state:
                _LOGGER.info(
                    "rollout %s: %s → %s%s", rollout_id, state.value, decision.state.value,
                    f" ({decision.reason})" if decision.reason else "",
                )  # fmt: skip
        self._carry_out(rollout_id, token, decision)

    def _carry_out(self, rollout_id: int, token: int, decision: Decision) -> None:
        """One transaction per device (its new rev and its target row together), then the
        document goes to the broker; a device that fails is logged and tried next round."""
        key = self.context.signing_key
        moves = [(start_target, d) for d in decision.deploy]
        moves += [(revert_target, t.device_id) for t in decision.revert]
        for move, device_id in moves:
            if self._stop.is_set():
                return
            try:
                with self.context.database.session() as s:
                    done = move(
                        s, rollout_id=rollout_id, token=token, device_id=device_id, key=key,
                        lifetime=self.lifetime,
                    )  # fmt: skip
            except (Deposed, Conflict):
                raise
            except EdgeFleetError as exc:
                _LOGGER.warning("rollout %s: %s not moved: %s", rollout_id, device_id, exc.message)
                continue
            if done:
                self.publish(device_id)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                # A database or Redis hiccup must not end rollouts for good.
                _LOGGER.exception("rollout engine round failed; next in %ss", self.tick_s)
            self._wake.wait(self.tick_s)
            self._wake.clear()
