"""RolloutEngine: while it leads (``Leadership``), each round reads every active rollout,
decides with ``progress.step`` and carries the decision out through fenced writes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from redis import RedisError
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from cloud.context import CloudContext
from cloud.registry.tables import ModelVersion, Rollout
from cloud.rollout.leader import Leadership
from cloud.rollout.progress import Decision, step
from cloud.rollout.reads import load_targets, reports_for
from cloud.rollout.setbacks import fail_target, halt
from cloud.rollout.store import (
    ACTIVE_STATES,
    Deposed,
    StaleDecision,
    apply_decision,
    revert_targets,
    start_targets,
)
from cloud.rollout.strategy import RolloutState, stored_strategy
from shared.errors import EdgeFleetError

__all__ = ["GIVE_UP_AFTER", "GIVE_UP_AFTER_S", "RolloutEngine"]

_LOGGER = logging.getLogger(__name__)

# Hands a device's newest desired document to the broker (the keeper's publish).
Publish = Callable[[str], bool]
# The same for a batch of devices at once (the keeper's publish_many): how many it took.
PublishMany = Callable[[list[str]], int]
# A rollout that fails with an unexpected error this many rounds in a row, for at least this
# long, is ended: a bug that lasts a moment must not abort (and roll back) a healthy rollout.
GIVE_UP_AFTER = 10
GIVE_UP_AFTER_S = 60.0
# A database or Redis that is away comes back: never a reason to end a rollout.
_TRANSIENT = (SQLAlchemyError, RedisError, OSError)
# What makes one device impossible to move (no higher rev, a desired state that cannot be
# built): that device fails, the others go on.
_DEVICE_ERRORS = (EdgeFleetError, ValueError, LookupError, TypeError)


# A batch rolled back by a database error is tried again at once this often in all.
_BATCH_ATTEMPTS = 3
# start_targets or revert_targets: one batch of devices moved in one transaction.
_Move = Callable[..., list[str]]


class _LeaseLost(Exception):
    """The lease could not be renewed mid-round: act on nothing more."""


class RolloutEngine:
    def __init__(
        self,
        context: CloudContext,
        publish: Publish,
        *,
        tick_s: float = 0.5,
        leadership: Leadership | None = None,
        batch_size: int | None = None,
        publish_many: PublishMany | None = None,
        release_after_s: float | None = None,
    ) -> None:
        self.context = context
        self.publish = publish
        # When given, a committed batch is published with one call (one read of its rows).
        self.publish_many = publish_many
        self.tick_s = tick_s
        # Devices moved per transaction (EDGEFLEET_ROLLOUT_BATCH_SIZE).
        self.batch_size = batch_size or context.settings.rollout_batch_size
        # A decision's committed documents go to the broker together, at the end or once the
        # oldest has waited this long (EDGEFLEET_ROLLOUT_RELEASE_AFTER_S).
        self.release_after_s = (
            context.settings.rollout_release_after_s if release_after_s is None else release_after_s
        )
        self.leadership = leadership or Leadership(context.redis)
        self.lifetime = timedelta(seconds=context.settings.desired_lifetime_s)
        self.rounds = 0
        # For /metrics: rollout rounds that raised, and devices that could not be moved.
        self.errors = 0
        self.unmovable = 0
        # Batches rolled back on a database error and tried again at once.
        self.batch_retries = 0
        self.give_up_after, self.give_up_after_s = GIVE_UP_AFTER, GIVE_UP_AFTER_S
        # Rollout id → (rounds in a row that raised, time.monotonic() of the first of them).
        self._failures: dict[int, tuple[int, float]] = {}
        self._renewed = 0.0  # time.monotonic() of the last renewal of the lease
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
            if self._thread.is_alive():
                # Releasing now would let another engine act while this round still writes;
                # the thread releases the lease when it ends (else it expires).
                _LOGGER.warning("rollout engine: a round still runs after %ss", timeout)
                return
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
        self._renewed = time.monotonic()
        with self.context.database.session() as s:
            ids = s.scalars(
                select(Rollout.id)
                .where(Rollout.state.in_([state.value for state in ACTIVE_STATES]))
                .order_by(Rollout.id)
            ).all()
        for rollout_id in ids:
            if self._stop.is_set():
                break
            next_token = self._round(rollout_id, token, now or datetime.now(UTC))
            if next_token is None:
                return False
            token = next_token
        self.rounds += 1
        return True

    def _round(self, rollout_id: int, token: int, now: datetime) -> int | None:
        """Advance one rollout, whatever it raises; the token to go on with (None: we do not
        lead any more). One rollout's failure never stops the others."""
        for attempt in (1, 2):
            try:
                if not self._leading():
                    return None
                self._advance(rollout_id, token, now)
            except Deposed as exc:
                fresh = self._refence() if attempt == 1 else None
                if fresh is None:
                    _LOGGER.warning("rollout engine deposed: %s", exc.message)
                    self.leadership.token = None
                    return None
                token, self._renewed = fresh, time.monotonic()
                continue
            except _LeaseLost:
                return None
            except StaleDecision as exc:
                _LOGGER.debug("rollout %s: %s; deciding again next round", rollout_id, exc)
            except _TRANSIENT as exc:
                self.errors += 1
                _LOGGER.warning("rollout %s: %s; trying again next round", rollout_id, exc)
            except Exception as exc:
                self._failed(rollout_id, token, exc)
            else:
                self._failures.pop(rollout_id, None)
            return token
        return token

    def _leading(self) -> bool:
        """Renew the lease once a third of it has passed: a round (a wave of thousands of
        devices) may outlast it. False once it is lost: stop acting at once."""
        if time.monotonic() - self._renewed < self.leadership.ttl_s / 3:
            return True
        if not self.leadership.renew():
            return False
        self._renewed = time.monotonic()
        return True

    def _refence(self) -> int | None:
        """Deposed while the lease may still be ours: if it is, the fencing counter went
        backwards, so take a token above every fence the registry holds and go on."""
        with self.context.database.session() as s:
            highest = s.scalar(select(func.max(Rollout.fence))) or 0
        return self.leadership.refence(above=int(highest))

    def _failed(self, rollout_id: int, token: int, exc: Exception) -> None:
        """Count and log a rollout's unexpected error (the traceback once a streak); after
        ``give_up_after`` rounds in a row over ``give_up_after_s``, end it with the reason
        instead of failing forever."""
        self.errors += 1
        rounds, since = self._failures.get(rollout_id, (0, time.monotonic()))
        rounds += 1
        self._failures[rollout_id] = (rounds, since)
        _LOGGER.error(
            "rollout %s: round failed (%s in a row): %s", rollout_id, rounds, exc,
            exc_info=exc if rounds == 1 else None,
        )  # fmt: skip
        if rounds < self.give_up_after or time.monotonic() - since < self.give_up_after_s:
            return
        self._failures.pop(rollout_id, None)
        self._halt(
            rollout_id,
            token,
            f"could not be decided ({rounds} rounds): {type(exc).__name__}: {exc}",
        )

    def _halt(self, rollout_id: int, token: int, reason: str) -> None:
        try:
            with self.context.database.session() as s:
                rollout = s.get(Rollout, rollout_id)
                if rollout is None or RolloutState(rollout.state).finished:
                    return
                state = halt(s, rollout_id=rollout_id, token=token, expect=rollout.state,
                             reason=reason)  # fmt: skip
        except EdgeFleetError as exc:  # deposed or changed meanwhile: the next round decides
            _LOGGER.warning("rollout %s: not ended: %s", rollout_id, exc.message)
            return
        _LOGGER.error("rollout %s: %s (%s)", rollout_id, state, reason)

    def _advance(self, rollout_id: int, token: int, now: datetime) -> None:
        with self.context.database.session() as s:
            rollout = s.get(Rollout, rollout_id)
            if rollout is None:
                return
            version = None  # an undeploy
            if rollout.model_version_id is not None:
                version = s.scalar(
                    select(ModelVersion.version).where(ModelVersion.id == rollout.model_version_id)
                )
                assert version is not None
            state, wave = RolloutState(rollout.state), rollout.current_wave
            strategy, invalid = stored_strategy(rollout.strategy)
            targets = load_targets(s, rollout)
            reports = reports_for(s, rollout)
        if invalid is not None and state is not RolloutState.ABORTING:
            self._halt(rollout_id, token, invalid)
            return
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
        """The devices to move, ``batch_size`` to a transaction (their new revs and target
        rows together). The lease is checked before each batch; a rollout changed meanwhile
        (StaleDecision) or a lease lost stops the rest, and what was not committed is decided
        again next round.

        The committed documents are released to the broker together: when the decision is
        carried out (or stops), or once the oldest waited ``release_after_s``. A wave's
        devices then join the chunk carousel within moments of each other and share its
        passes; released batch by batch, the first devices were already downloading (and
        taking the CPU) while the rest were still being written, and they joined over more
        time than a pass waits, so the artifact went out three times and more."""
        moves = [
            (start_targets, False, decision.deploy),
            (revert_targets, True, [t.device_id for t in decision.revert]),
        ]
        held: list[str] = []
        since = time.monotonic()
        try:
            for move, reverting, device_ids in moves:
                for first in range(0, len(device_ids), self.batch_size):
                    if self._stop.is_set():
                        return
                    batch = device_ids[first : first + self.batch_size]
                    if not held:
                        since = time.monotonic()
                    self._send(move, rollout_id, token, batch, reverting=reverting, out=held)
                    if held and time.monotonic() - since >= self.release_after_s:
                        self._release(held)
                        held = []
        finally:
            self._release(held)

    def _send(
        self,
        move: _Move,
        rollout_id: int,
        token: int,
        device_ids: list[str],
        *,
        reverting: bool,
        out: list[str],
    ) -> None:
        """One batch in one transaction; the devices to publish go to ``out`` as soon as
        they may have committed (whatever is raised later, they are released). A device that
        cannot be moved makes the database roll the whole batch back: it is split in halves
        until that device is found, and it fails alone while the others are moved. A
        database error rolls it back too and it is tried again at once (``_BATCH_ATTEMPTS``
        in all), then left to the next round: a device is never half moved, nor given two
        revs."""
        for attempt in range(1, _BATCH_ATTEMPTS + 1):
            if not self._leading():
                raise _LeaseLost
            try:
                with self.context.database.session() as s:
                    done = move(
                        s, rollout_id=rollout_id, token=token, device_ids=device_ids,
                        key=self.context.signing_key, lifetime=self.lifetime,
                    )  # fmt: skip
            except (Deposed, StaleDecision):
                raise
            except _TRANSIENT as exc:
                # The error may have come as the commit went through (its devices are then no
                # longer PENDING, so not in a retry's ``done``): publish the whole batch
                # whatever happens next. Publishing sends what SQL holds, so a device sent
                # twice, or one that did not move after all, gets its newest document.
                out.extend(device_ids)
                if attempt == _BATCH_ATTEMPTS:
                    raise
                self.batch_retries += 1
                _LOGGER.warning(
                    "rollout %s: batch of %s rolled back (%s); trying again",
                    rollout_id, len(device_ids), exc,
                )  # fmt: skip
                continue
            except _DEVICE_ERRORS as exc:
                if len(device_ids) == 1:
                    self._cannot_move(rollout_id, token, device_ids[0], reverting, exc)
                    return
                half = len(device_ids) // 2
                for part in (device_ids[:half], device_ids[half:]):
                    self._send(move, rollout_id, token, part, reverting=reverting, out=out)
                return
            out.extend(done)
            return

    def _release(self, device_ids: list[str]) -> None:
        """Hand committed documents to the broker, ``batch_size`` to a call. Never raises:
        this also runs while an error leaves ``_carry_out``, and what SQL holds is not lost —
        a device the keeper could not read or hand over is published again by its upkeep."""
        device_ids = list(dict.fromkeys(device_ids))  # a batch tried again is in twice
        for first in range(0, len(device_ids), self.batch_size):
            batch = device_ids[first : first + self.batch_size]
            try:
                if self.publish_many is not None:
                    self._keep_lease()
                    self.publish_many(batch)
                else:
                    for device_id in batch:
                        self._keep_lease()
                        self.publish(device_id)
            except Exception:
                _LOGGER.exception("rollout engine: %s documents not handed over", len(batch))

    def _keep_lease(self) -> None:
        """Renew the lease while a long release goes on (a broker slow to take a wave's
        documents must not let a rival take over the next round's decisions). Publishing
        needs no lease (it sends what SQL holds), so a lease lost does not stop it."""
        try:
            self._leading()
        except Exception as exc:  # Redis away: the next round finds out
            _LOGGER.debug("rollout engine: lease not renewed while releasing: %s", exc)

    def _cannot_move(
        self, rollout_id: int, token: int, device_id: str, reverting: bool, exc: Exception
    ) -> None:
        why = exc.message if isinstance(exc, EdgeFleetError) else f"{type(exc).__name__}: {exc}"
        reason = f"cannot be {'sent back' if reverting else 'moved'}: {why}"
        with self.context.database.session() as s:
            failed = fail_target(s, rollout_id=rollout_id, token=token, device_id=device_id,
                                 reverting=reverting, reason=reason)  # fmt: skip
        if failed:
            self.unmovable += 1
            _LOGGER.warning("rollout %s: %s %s", rollout_id, device_id, reason)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.tick()
                except Exception:
                    # A database or Redis hiccup must not end rollouts for good.
                    self.errors += 1
                    _LOGGER.exception("rollout engine round failed; next in %ss", self.tick_s)
                self._wake.wait(self.tick_s)
                self._wake.clear()
        finally:
            self.leadership.release()
