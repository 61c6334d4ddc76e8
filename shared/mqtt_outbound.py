"""What a link has sent and the broker has not acknowledged yet: counted by packet id, so a
sender can keep no more than so many QoS 1 messages unacknowledged (the chunk carousel)."""

from __future__ import annotations

import threading
import time

__all__ = ["Unacknowledged"]

# How long an acknowledgement nobody claims is remembered (see ``acked``).
_EARLY_ACK_S = 2.0


class Unacknowledged:
    """``sent(mid)`` when paho took a QoS >= 1 message, ``acked(mid)`` on its PUBACK (paho's
    on_publish, on the network thread); ``count`` is what is in between. The PUBACK may come
    before the publishing thread calls ``sent``: such an ack is remembered a moment and
    cancels the ``sent`` that follows. paho also reports QoS 0 messages as they are written:
    their ids are never sent here, and are forgotten after that moment."""

    def __init__(self) -> None:
        self._awaiting: dict[int, float] = {}  # mid -> when handed to paho
        self._early: dict[int, float] = {}  # mid -> when its ack came, unclaimed
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._awaiting)

    def sent(self, mid: int) -> None:
        with self._lock:
            if self._early.pop(mid, None) is None:
                self._awaiting[mid] = time.monotonic()

    def acked(self, mid: int) -> None:
        now = time.monotonic()
        with self._lock:
            if self._awaiting.pop(mid, None) is not None:
                return
            self._early.pop(mid, None)
            self._early[mid] = now
            while True:  # forget the old ones, oldest first (dicts keep insertion order)
                early, seen = next(iter(self._early.items()))
                if now - seen < _EARLY_ACK_S:
                    break
                del self._early[early]
