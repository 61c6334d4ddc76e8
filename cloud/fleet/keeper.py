"""DesiredStateKeeper: changes, renews and publishes each device's signed desired state."""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from cloud.context import CloudContext
from cloud.fleet.desired import (
    devices_due_for_renewal,
    devices_with_documents,
    issue,
    renew,
    renewal_due,
    set_deployment,
)
from cloud.registry import repository
from cloud.registry.tables import Device
from shared import topics
from shared.errors import Conflict, EdgeFleetError, ServiceUnavailable
from shared.messages import DesiredState
from shared.topics import DeviceTopic

__all__ = ["DesiredStateKeeper", "Publish"]

_LOGGER = logging.getLogger(__name__)

# Publishes a retained message; False when it could not even be queued.
Publish = Callable[[str, str], bool]

_LOCK_STRIPES = 64
RENEWAL_BATCH = 500


class DesiredStateKeeper:
    """SQL holds every device's signed document (the source of truth); the broker holds a
    retained copy. Changes are committed under the device's row lock, then published;
    documents are re-signed before they expire; a broker that (re)connects gets them all
    back from SQL, whatever Redis or the broker lost."""

    def __init__(self, context: CloudContext, publish: Publish) -> None:
        self.context = context
        self._publish = publish
        self.lifetime = timedelta(seconds=context.settings.desired_lifetime_s)
        self.interval_s = context.settings.desired_renewal_interval_s
        # Striped: bounded memory however many devices, and two devices rarely share one.
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._republish = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- changes -------------------------------------------------------------------------

    def deploy(
        self, *, device_id: str, model: str, version: int, rollout_id: int | None = None
    ) -> DesiredState:
        """Point ``device_id`` at ``model:version`` under a new rev, store it, publish it."""
        with self.context.database.session() as s:
            device = repository.lock_device(s, device_id=device_id)
            row = repository.get_version(s, model_name=model, version=version)
            set_deployment(device=device, version=row, rollout_id=rollout_id)
            state = issue(s, device=device, key=self.context.signing_key, lifetime=self.lifetime)
        self._publish_or_raise(device_id)
        return state

    def retry(self, *, device_id: str, actor: str) -> DesiredState:
        """Sign the device's current model set again under a new rev, so a device that
        FAILED the last rev (and ignores that rev from now on) tries it once more."""
        with self.context.database.session() as s:
            device = repository.lock_device(s, device_id=device_id)
            if device.desired_document is None:
                raise Conflict(f"device {device_id!r} has no desired state to retry")
            previous = device.desired_rev
            state = issue(s, device=device, key=self.context.signing_key, lifetime=self.lifetime)
            repository.record_audit(
                s, actor=actor, action="desired.retry", subject=device_id,
                detail={"rev": state.rev, "previous_rev": previous},
            )  # fmt: skip
        self._publish_or_raise(device_id)
        return state

    def renew_due(self, now: datetime | None = None) -> int:
        """Re-sign (same rev) and publish every document with a third of its lifetime left."""
        now = now or datetime.now(UTC)
        with self.context.database.session() as s:
            due = devices_due_for_renewal(s, now=now, limit=RENEWAL_BATCH)
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
                _LOGGER.warning("desired state of %s not renewed: %s", device_id, exc.message)
                continue
            _LOGGER.info("renewed desired state of %s rev %s", device_id, state.rev)
            self.publish(device_id)
            renewed += 1
        if len(due) == RENEWAL_BATCH:
            self._wake.set()  # more are due: go on at once
        return renewed

    # -- publication ---------------------------------------------------------------------

    def publish(self, device_id: str) -> bool:
        """Publish (retained) the newest document stored for ``device_id``.

        Two changes can commit in one order and reach the broker in the other, leaving an
        older rev retained. So each publish happens under the device's lock and reads the
        document afresh: every change commits before it takes the lock, hence the last
        publish for a device reads (and sends) the newest rev, and one connection keeps
        the order of what we hand it.
        """
        with self._locks[zlib.crc32(device_id.encode()) % _LOCK_STRIPES]:
            with self.context.database.session() as s:
                device = s.get(Device, device_id)
                document = device.desired_document if device is not None else None
            if document is None:
                return True  # nothing signed yet, or the device was removed meanwhile
            return self._publish(topics.device_topic(device_id, DeviceTopic.DESIRED), document)

    def _publish_or_raise(self, device_id: str) -> None:
        if not self.publish(device_id):
            raise ServiceUnavailable(
                "the broker did not take the desired state; it is republished on reconnect"
            )

    def request_republish(self) -> None:
        """Give every stored document back to the broker (called on each connect): a broker
        that keeps nothing, or a Redis that was restarted, loses nothing of ours."""
        self._republish.set()
        self._wake.set()

    def republish_all(self) -> int:
        """Publish every stored document; how many were handed to the broker."""
        with self.context.database.session() as s:
            device_ids = devices_with_documents(s)
        published = failed = 0
        for device_id in device_ids:
            if self._stop.is_set():
                break
            if self.publish(device_id):
                published += 1
            else:
                failed += 1
        if failed:
            _LOGGER.warning(
                "%s of %s desired states not queued for the broker; trying again in %ss",
                failed, len(device_ids), self.interval_s,
            )  # fmt: skip
            self._republish.set()
        return published

    # -- the upkeep loop -----------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="desired-keeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._republish.is_set():
                    self._republish.clear()
                    self.republish_all()
                self.renew_due()
            except Exception:
                # A database hiccup must not end renewal for good: log it, try next round.
                _LOGGER.exception("desired-state upkeep failed; next try in %ss", self.interval_s)
            self._wake.wait(self.interval_s)
            self._wake.clear()
