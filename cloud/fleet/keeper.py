"""DesiredStateKeeper: changes, renews and publishes each device's signed desired state."""

from __future__ import annotations

import contextlib
import logging
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from cloud.context import CloudContext
from cloud.fleet.desired import (
    devices_deleted_since,
    devices_due_for_renewal,
    devices_with_documents,
    issue,
    postpone_renewal,
    renew,
    renewal_due,
    set_deployment,
)
from cloud.registry import repository
from cloud.registry.tables import Device
from shared import topics
from shared.errors import Conflict, EdgeFleetError
from shared.messages import DesiredState
from shared.topics import DeviceTopic

__all__ = ["LEGACY_REDIS_KEY", "DesiredStateKeeper", "Issued", "Publish"]

_LOGGER = logging.getLogger(__name__)

# Publishes a retained message; False when it could not even be queued.
Publish = Callable[[str, str], bool]

_LOCK_STRIPES = 64
RENEWAL_BATCH = 500
# A document the broker would not take is tried again this soon (or each round, if sooner).
PENDING_RETRY_S = 5.0
# Where documents lived before SQL kept them; nothing reads it any more.
LEGACY_REDIS_KEY = "edgefleet:desired"
# What a device that is gone leaves retained: the cloud's document and the agent's reports.
_CLEARED_WHEN_DELETED = (DeviceTopic.DESIRED, DeviceTopic.REPORTED, DeviceTopic.PRESENCE)


@dataclass(frozen=True, slots=True)
class Issued:
    """A change committed to SQL; ``published`` is False when the broker did not take it yet
    (it is sent again on the keeper's next round, and on every reconnect)."""

    state: DesiredState
    published: bool


class DesiredStateKeeper:
    """SQL holds every device's signed document (the source of truth); the broker holds a
    retained copy. Changes are committed under the device's row lock, then published;
    documents are re-signed before they expire; a broker that (re)connects gets them all
    back from SQL, whatever Redis or the broker lost, and loses those of deleted devices."""

    def __init__(self, context: CloudContext, publish: Publish) -> None:
        self.context = context
        self._publish = publish
        self.lifetime = timedelta(seconds=context.settings.desired_lifetime_s)
        self.interval_s = context.settings.desired_renewal_interval_s
        self.renewal_batch = RENEWAL_BATCH
        self.pending_retry_s = min(self.interval_s, PENDING_RETRY_S)
        # Striped: bounded memory however many devices, and two devices rarely share one.
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        # Devices whose retained topics the broker did not take: tried again each round.
        self._pending: set[str] = set()
        self._pending_lock = threading.Lock()
        self._republish = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- changes -------------------------------------------------------------------------

    def issue_deployment(
        self,
        *,
        device_id: str,
        model: str,
        version: int,
        rollout_id: int | None = None,
        actor: str = "fleet",
    ) -> Issued:
        """Point ``device_id`` at ``model:version`` under a new rev: signed, stored and
        audited (``actor``) in one transaction, then published."""
        with self.context.database.session() as s:
            device = repository.lock_device(s, device_id=device_id)
            row = repository.get_version(s, model_name=model, version=version)
            set_deployment(device=device, version=row, rollout_id=rollout_id)
            state = issue(
                s, device=device, key=self.context.signing_key, lifetime=self.lifetime,
                actor=actor,
            )  # fmt: skip
            repository.record_audit(
                s, actor=actor, action="device.deploy", subject=device_id,
                detail={"model": model, "version": version, "rev": state.rev,
                        "rollout_id": rollout_id},
            )  # fmt: skip
        return Issued(state, self.publish(device_id))

    def deploy(
        self, *, device_id: str, model: str, version: int, rollout_id: int | None = None
    ) -> DesiredState:
        """:meth:`issue_deployment` for the fleet itself; a document the broker did not take
        yet is committed all the same and follows on the next round."""
        return self.issue_deployment(
            device_id=device_id, model=model, version=version, rollout_id=rollout_id
        ).state

    def retry(self, *, device_id: str, actor: str) -> Issued:
        """Sign the device's current model set again under a new rev, so a device that
        FAILED the last rev (and ignores that rev from now on) tries it once more."""
        with self.context.database.session() as s:
            device = repository.lock_device(s, device_id=device_id)
            if device.desired_document is None:
                raise Conflict(f"device {device_id!r} has no desired state to retry")
            previous = device.desired_rev
            state = issue(
                s, device=device, key=self.context.signing_key, lifetime=self.lifetime,
                actor=actor,
            )  # fmt: skip
            repository.record_audit(
                s, actor=actor, action="desired.retry", subject=device_id,
                detail={"rev": state.rev, "previous_rev": previous},
            )  # fmt: skip
        return Issued(state, self.publish(device_id))

    def renew_due(self, now: datetime | None = None) -> int:
        """Re-sign (same rev) and publish every document with a third of its lifetime left.

        A renewal that fails (a row naming a version since removed) is postponed by one
        round, so it neither stays first in line nor keeps the loop from sleeping.
        """
        now = now or datetime.now(UTC)
        with self.context.database.session() as s:
            due = devices_due_for_renewal(s, now=now, limit=self.renewal_batch)
        renewed = 0
        for device_id in due:
            if self._stop.is_set():
                return renewed
            try:
                with self.context.database.session() as s:
                    device = repository.lock_device(s, device_id=device_id)
                    if not renewal_due(device, now=now):
                        continue  # changed (so re-signed) since we looked
                    state = renew(
                        s, device=device, key=self.context.signing_key, lifetime=self.lifetime,
                        now=now,
                    )  # fmt: skip
            except EdgeFleetError as exc:
                _LOGGER.warning(
                    "desired state of %s not renewed: %s; next try in %ss",
                    device_id, exc.message, self.interval_s,
                )  # fmt: skip
                with self.context.database.session() as s:
                    until = now + timedelta(seconds=self.interval_s)
                    postpone_renewal(s, device_id=device_id, until=until, now=now)
                continue
            _LOGGER.info("renewed desired state of %s rev %s", device_id, state.rev)
            self.publish(device_id)
            renewed += 1
        if len(due) == self.renewal_batch and renewed:
            self._wake.set()  # more are due: go on at once
        return renewed

    # -- publication ---------------------------------------------------------------------

    def publish(self, device_id: str) -> bool:
        """Make what the broker retains for ``device_id`` what SQL says: its newest document;
        an empty desired topic when it has none; and, for a device SQL no longer has, empty
        desired, reported and presence topics (a device enrolled again under that id must
        not receive its predecessor's document). False when the broker did not take it:
        the device is then tried again on each round until it does.

        Two changes can commit in one order and reach the broker in the other, leaving an
        older rev retained. So each publish happens under the device's lock and reads the
        row afresh: every change commits before it takes the lock, hence the last publish
        for a device reads (and sends) the newest state, and one connection keeps the order
        of what we hand it.
        """
        return self._publish_one(device_id) is True

    def _publish_one(self, device_id: str) -> bool | None:
        """:meth:`publish`; None when the database did not give us the row (the device is
        then pending): a round over many devices stops there instead of trying each."""
        with self._locks[_stripe(device_id)]:
            try:
                with self.context.database.session() as s:
                    device = s.get(Device, device_id)
                    document = device.desired_document if device is not None else None
            except SQLAlchemyError as exc:
                self._unread([device_id], exc)
                return None
            handed = self._hand_over(device_id, device is not None, document)
        self._note(device_id, handed)
        return handed

    def publish_many(self, device_ids: list[str]) -> int:
        """:meth:`publish` for many devices at once (a batch the rollout engine committed):
        every one of their locks taken (in stripe order, so two callers cannot deadlock; any
        other caller holds one), their rows read in one query, then each handed to the
        broker. How many the broker took."""
        ids = list(dict.fromkeys(device_ids))
        with contextlib.ExitStack() as held:
            for stripe in sorted({_stripe(device_id) for device_id in ids}):
                held.enter_context(self._locks[stripe])
            try:
                with self.context.database.session() as s:
                    found = select(Device.id, Device.desired_document).where(Device.id.in_(ids))
                    documents: dict[str, str | None] = dict(s.execute(found).all())
            except SQLAlchemyError as exc:
                return self._unread(ids, exc)
            handed = {
                device_id: self._hand_over(
                    device_id, device_id in documents, documents.get(device_id)
                )
                for device_id in ids
            }
        for device_id, ok in handed.items():
            self._note(device_id, ok)
        return sum(handed.values())

    def _hand_over(self, device_id: str, exists: bool, document: str | None) -> bool:
        """Give the broker what it should retain for the device (its lock held)."""
        kinds = (DeviceTopic.DESIRED,) if exists else _CLEARED_WHEN_DELETED
        handed = True
        for kind in kinds:
            payload = document if kind is DeviceTopic.DESIRED and document else ""
            handed = self._publish(topics.device_topic(device_id, kind), payload) and handed
        return handed

    def _unread(self, device_ids: list[str], exc: SQLAlchemyError) -> int:
        """The database did not give us their rows (a change to them may have committed just
        before): keep them for the next round like a refusal from the broker. Returns 0."""
        _LOGGER.warning("%s devices' documents not read (%s); trying again", len(device_ids), exc)
        for device_id in device_ids:
            self._note(device_id, False)
        return 0

    def _note(self, device_id: str, handed: bool) -> None:
        """Keep a device the broker did not take for the next round (and wake it)."""
        with self._pending_lock:
            newly_pending = not handed and device_id not in self._pending
            if handed:
                self._pending.discard(device_id)
            else:
                self._pending.add(device_id)
        if newly_pending:
            # The loop may be asleep for a whole renewal interval: let it retry soon. Only
            # for a device not pending yet, so a broker that keeps refusing cannot spin it.
            self._wake.set()

    def clear(self, device_id: str) -> bool:
        """After ``device_id`` was deleted (committed): empty its retained topics. The same
        as :meth:`publish`, named for the caller; a clear the broker did not take is tried
        again each round, and every reconnect clears recently deleted devices again."""
        return self.publish(device_id)

    def request_republish(self) -> None:
        """Give every stored document back to the broker (called on each connect): a broker
        that keeps nothing, or a Redis that was restarted, loses nothing of ours."""
        self._republish.set()
        self._wake.set()

    def republish_all(self, now: datetime | None = None) -> int:
        """Publish every stored document, and clear the retained topics of every device
        deleted within a document's lifetime (an older document has expired, and agents
        refuse it); how many were handed to the broker."""
        now = now or datetime.now(UTC)
        with self.context.database.session() as s:
            device_ids = devices_with_documents(s)
            deleted = devices_deleted_since(s, since=now - self.lifetime)
        # A deleted id enrolled and deployed again is in both lists: publish it once.
        ordered = list(dict.fromkeys([*device_ids, *deleted]))
        published = 0
        for device_id in ordered:
            if self._stop.is_set():
                break
            handed = self._publish_one(device_id)
            if handed is None:  # the database went away: all of it again next round
                self._republish.set()
                return published
            published += handed
        if published < len(ordered):
            _LOGGER.warning(
                "%s of %s devices' retained topics not queued for the broker; trying again",
                len(ordered) - published, len(ordered),
            )  # fmt: skip
        return published

    def pending(self) -> set[str]:
        """Devices whose retained topics the broker has not taken yet."""
        with self._pending_lock:
            return set(self._pending)

    def publish_pending(self) -> int:
        """Try again every device the broker did not take; how many it took now."""
        with self._pending_lock:
            due = sorted(self._pending)
        taken = 0
        for device_id in due:
            if self._stop.is_set():
                break
            handed = self._publish_one(device_id)
            if handed is None:  # the database is away: the rest waits for the next round
                break
            taken += handed
        return taken

    # -- the upkeep loop -----------------------------------------------------------------

    def upkeep(self, now: datetime | None = None) -> None:
        """One round: give everything back after a (re)connect, retry what the broker did
        not take, renew what is due."""
        if self._republish.is_set():
            self._republish.clear()
            try:
                self.republish_all(now)
            except Exception:
                self._republish.set()  # the database went away before the list: next round
                raise
        self.publish_pending()
        self.renew_due(now)

    def start(self) -> None:
        self._forget_legacy_copies()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="desired-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _forget_legacy_copies(self) -> None:
        # Before SQL kept them, signed documents lived in one Redis hash; SQL has them all
        # now (migration 0004 made every such row due for renewal).
        try:
            self.context.redis.delete(LEGACY_REDIS_KEY)
        except RedisError as exc:
            _LOGGER.warning("could not remove the old Redis copy %s: %s", LEGACY_REDIS_KEY, exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.upkeep()
            except Exception:
                # A database hiccup must not end renewal for good: log it, try next round.
                _LOGGER.exception("desired-state upkeep failed; next try in %ss", self.interval_s)
            wait = self.pending_retry_s if self.pending() else self.interval_s
            self._wake.wait(wait)
            self._wake.clear()


def _stripe(device_id: str) -> int:
    return zlib.crc32(device_id.encode()) % _LOCK_STRIPES
