"""Artifact chunks over MQTT, scheduled by artifact: a carousel per artifact that some device
still lacks (cloud/fleet/carousel.py) sends the chunks anyone asked for, each once per pass,
and the broker fans each one out to every device subscribed — the cloud's egress follows the
number of artifacts in flight, not the number of devices.

The pace is the broker's: at most ``max_in_flight`` of our QoS 1 publishes wait for its
acknowledgement at any time (``in_flight``, woken by :meth:`ChunkBroadcaster.acked`), so
paho's queue, and our memory, stay bounded whatever the fleet's size. Chunks are read from
disk as they are sent; what is kept is one timestamp per wanted chunk, whoever wants it.

Requests arrive on the MQTT network thread and are only noted there; whether the asking
device may have the artifact (a registry read) is decided on an admission thread of its own,
so neither the network thread (acks, keepalives) nor the sender waits on the database."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from cloud.artifacts.store import ArtifactStore
from cloud.fleet.carousel import Pacing, Reel
from cloud.fleet.watch import Throttle
from shared import topics
from shared.messages import ArtifactRequest

__all__ = ["ChunkBroadcaster"]

_LOGGER = logging.getLogger(__name__)

Publish = Callable[[str, bytes], bool]
ChunkSizeOf = Callable[[str], int | None]
# May these devices have these artifacts broadcast? [(device id, sha256)] -> one answer each
Allowed = Callable[[list[tuple[str, str]]], list[bool]]
MAX_INBOX = 50_000
_IDLE_WAIT_S = 0.5  # the longest the sender sleeps without a reason to wake
_RECHECK_S = 1.0  # requests whose check failed are checked again after this


class ChunkBroadcaster:
    """``request`` notes what a device lacks; a sender thread sends it, carousel-wise.

    ``in_flight`` says how many of our publishes the broker has not acknowledged (the link's
    :attr:`~shared.mqtt_link.MqttLink.in_flight`); none given, nothing holds the sender back
    but ``rate`` (bytes/s, an optional ceiling; None: none). ``pacing`` says when a new pass
    over an artifact may start (cloud/fleet/carousel.py)."""

    def __init__(
        self,
        store: ArtifactStore,
        publish: Publish,
        *,
        chunk_size_of: ChunkSizeOf,
        allowed: Allowed | None = None,
        window_s: float = 0.05,
        in_flight: Callable[[], int] | None = None,
        max_in_flight: int = 8,
        rate_bytes_per_s: float | None = None,
        pacing: Pacing | None = None,
        want_ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.publish = publish
        self.chunk_size_of = chunk_size_of
        self.allowed = allowed
        self.window_s = window_s  # requests are admitted in batches, at most this often
        self.in_flight = in_flight or (lambda: 0)
        self.max_in_flight = max_in_flight
        self.rate = rate_bytes_per_s
        self.pacing = pacing or Pacing()
        self.want_ttl_s = want_ttl_s
        self.clock = clock
        self._reels: dict[str, Reel] = {}
        self._turn = 0  # round-robin over the reels, one chunk each
        self._inbox: list[tuple[str | None, ArtifactRequest]] = []
        self._throttle = Throttle()
        self._lock = threading.Lock()
        self._wake = threading.Event()  # the sender: new wants, an ack, or stop
        self._admit_wake = threading.Event()
        self._stop = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="chunk-carousel", daemon=True)
        self._admitter = threading.Thread(
            target=self._admit_loop, name="chunk-admission", daemon=True
        )
        self.requests = 0
        self.chunks_published = 0
        self.bytes_published = 0
        self.passes = 0
        self.expired = 0  # wants nobody repeated within want_ttl_s
        self.errors = 0
        self.refused = 0  # requests for an artifact the device may not have, or none we have
        self.overflow = 0  # requests dropped while the inbox was full (the device asks again)
        self.held_back = 0  # times the sender waited for the broker's acknowledgements
        self._tokens = 0.0
        self._refilled = clock()
        self._rechecked: set[int] = set()  # requests put back once after a failed check

    def start(self) -> None:
        self._admitter.start()
        self._sender.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._admit_wake.set()
        self._admitter.join(5)
        self._sender.join(5)

    def acked(self) -> None:
        """The broker acknowledged a publish (the link's ``on_published``; network thread)."""
        self._wake.set()

    @property
    def wanted(self) -> int:
        """Chunks wanted now, over every artifact (what the carousel still has to send)."""
        with self._lock:
            return sum(len(reel.wanted) for reel in self._reels.values())

    # -- admission ---------------------------------------------------------------------

    def request(self, request: ArtifactRequest, device_id: str | None = None) -> None:
        """Note what ``device_id`` lacks (no I/O: this is the network thread)."""
        with self._lock:
            if len(self._inbox) >= MAX_INBOX:
                self.overflow += 1
                return
            self._inbox.append((device_id, request))
        self._admit_wake.set()

    def _admit_loop(self) -> None:
        while not self._stop.is_set():
            self._admit_wake.wait()
            self._admit_wake.clear()
            # Let requests from other devices pile up a moment, then check them together.
            self._stop.wait(self.window_s)
            try:
                self._admit()
            except Exception:
                self.errors += 1
                _LOGGER.exception("chunk requests not admitted; going on")

    def _admit(self) -> None:
        """Move the noted requests that pass the checks into their artifact's reel: every
        request noted since the last admission checked at once (a wave's devices ask within
        moments of each other; one registry read per request made the carousel see them
        join over tens of seconds, after their chunks had gone out)."""
        with self._lock:
            inbox, self._inbox = self._inbox, []
        if not inbox:
            return
        try:
            verdicts = self._verdicts(inbox)
        except Exception as exc:
            self.errors += 1
            # A registry or disk that failed for a moment: the requests (a wave's first asks
            # among them) are checked once more after a pause, ahead of what came meanwhile.
            # Any other error, or a second failure, drops them (the devices ask again), so
            # one request that always fails cannot hold the others back.
            again = [r for r in inbox if id(r) not in self._rechecked] if _passing(exc) else []
            self._rechecked = {id(r) for r in again}
            if (held := self._throttle.allow("error")) is not None:
                _LOGGER.exception(
                    "%s chunk requests not checked; %s checked again in %ss%s",
                    len(inbox), len(again), _RECHECK_S, _more(held),
                )  # fmt: skip
            if again:
                with self._lock:
                    kept = (again + self._inbox)[:MAX_INBOX]
                    self.overflow += len(again) + len(self._inbox) - len(kept)
                    self._inbox = kept
                self._stop.wait(_RECHECK_S)
                self._admit_wake.set()
            return
        self._rechecked = set()
        admitted = False
        for (device_id, request), reel in zip(inbox, verdicts, strict=True):
            if isinstance(reel, str):
                self.refused += 1
                if (held := self._throttle.allow("refused")) is not None:
                    _LOGGER.warning(
                        "refused chunk request of %s for %s: %s%s",
                        device_id, request.sha256[:12], reel, _more(held),
                    )  # fmt: skip
                continue
            with self._lock:
                reel = self._reels.setdefault(request.sha256, reel)
                reel.ask(
                    request.chunks, self.clock(), self.pacing, first=request.first,
                    passed_over=request.passed_over, device=device_id,
                )  # fmt: skip
                self.requests += 1
            admitted = True
        if admitted:
            self._wake.set()

    def _verdicts(self, inbox: list[tuple[str | None, ArtifactRequest]]) -> list[Reel | str]:
        """For each request: a reel for its artifact, or why it is refused. One check of
        the devices' rights for the whole inbox, one look at each artifact."""
        rights: list[bool] = [True] * len(inbox)
        if self.allowed is not None:
            asks = [(device_id, request.sha256) for device_id, request in inbox if device_id]
            answers = iter(self.allowed(asks))
            rights = [bool(device_id) and next(answers) for device_id, _ in inbox]
        reels: dict[str, Reel | None] = {}
        verdicts: list[Reel | str] = []
        for (_, request), right in zip(inbox, rights, strict=True):
            if not right:
                verdicts.append("not in that device's desired state")
                continue
            if request.sha256 not in reels:
                reels[request.sha256] = self._lookup(request.sha256)
            reel = reels[request.sha256]
            verdicts.append(reel if reel is not None else "unknown artifact")
        return verdicts

    def _lookup(self, sha256: str) -> Reel | None:
        chunk_size = self.chunk_size_of(sha256)
        if chunk_size is None:
            return None
        try:
            size = self.store.path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        return Reel(sha256, chunk_size, -(-size // chunk_size))

    # -- sending -----------------------------------------------------------------------

    def _send_loop(self) -> None:
        expired_at = self.clock()
        while not self._stop.is_set():
            now = self.clock()
            if now - expired_at >= 1.0:
                expired_at = now
                self._expire(now)
            if self.in_flight() >= self.max_in_flight:
                # The broker has not taken what we sent: wait for its acknowledgements.
                self.held_back += 1
                self._sleep(_IDLE_WAIT_S)
                continue
            picked, wait = self._pick(now)
            if picked is None:
                self._sleep(min(wait, _IDLE_WAIT_S))
                continue
            reel, index, starts_pass = picked
            try:
                if not self._send(reel, index, starts_pass):
                    self._stop.wait(0.05)  # paho did not take it: do not spin on it
            except Exception:
                # A disk, database or client error ends what was wanted of this artifact (its
                # devices ask again), never the carousel: the other artifacts go on.
                self.errors += 1
                with self._lock:
                    if self._reels.get(reel.sha256) is reel:
                        del self._reels[reel.sha256]
                if (held := self._throttle.allow(f"send {reel.sha256}")) is not None:
                    _LOGGER.exception(
                        "chunk broadcast of %s failed; going on%s", reel.sha256[:12], _more(held)
                    )

    def _sleep(self, seconds: float) -> None:
        self._wake.wait(seconds)
        self._wake.clear()

    def _pick(self, now: float) -> tuple[tuple[Reel, int, bool] | None, float]:
        """The next (reel, chunk, whether it starts a pass), one reel after the other; or
        None and how long until a resting reel may go on."""
        with self._lock:
            reels = list(self._reels.values())
            wait = _IDLE_WAIT_S
            for step in range(len(reels)):
                reel = reels[(self._turn + step) % len(reels)]
                passes, joins, due = reel.passes, reel.joins, reel.due_since
                index = reel.next_index(now, self.pacing)
                if index is not None:
                    self._turn = (self._turn + step + 1) % len(reels)
                    if reel.passes != passes:
                        _LOGGER.info(
                            "pass %s over %s: %s chunks wanted, %s devices joined since the "
                            "last, held %.1f s", reel.passes, reel.sha256[:12], len(reel.wanted),
                            joins, now - due if due is not None else 0.0,
                        )  # fmt: skip
                    return (reel, index, reel.passes != passes), 0.0
                resting = reel.resting(now, self.pacing)
                if resting is not None:
                    wait = min(wait, resting)
            return None, wait

    def _send(self, reel: Reel, index: int, starts_pass: bool) -> bool:
        """Publish one chunk; False if paho did not take it (its queue is full): the chunk
        stays wanted."""
        if starts_pass:
            # Each pass looks the artifact up again: one removed meanwhile stops here.
            fresh = self._lookup(reel.sha256)
            if fresh is None:
                raise LookupError(f"artifact {reel.sha256[:12]} is gone")
            with self._lock:
                reel.chunk_size, reel.chunks = fresh.chunk_size, fresh.chunks
            self.passes += 1
        data = self.store.read_chunk(reel.sha256, index, chunk_size=reel.chunk_size)
        self._take(len(data))
        if not self.publish(topics.artifact_chunk(reel.sha256, index), data):
            return False
        self.chunks_published += 1
        self.bytes_published += len(data)
        with self._lock:
            reel.sent(index, self.clock())
        return True

    def _take(self, size: int) -> None:
        """Wait for ``size`` bytes of the optional rate ceiling (bursts of 100 ms worth)."""
        while not self._stop.is_set():
            rate = self.rate
            if rate is None:
                return
            now = self.clock()
            burst = max(rate * 0.1, size)
            self._tokens = min(burst, self._tokens + (now - self._refilled) * rate)
            self._refilled = now
            if self._tokens >= size:
                self._tokens -= size
                return
            self._stop.wait(min(0.05, (size - self._tokens) / rate))

    def _expire(self, now: float) -> None:
        with self._lock:
            for reel in list(self._reels.values()):
                self.expired += reel.expire(now - self.want_ttl_s)
                # A reel nobody asked anything of for a while goes; one just emptied stays,
                # so that an ask soon after waits for its next pass like the others.
                if not reel.wanted and now - reel.touched > max(self.want_ttl_s, 60.0):
                    del self._reels[reel.sha256]


def _passing(exc: Exception) -> bool:
    """An error that may be gone a moment later: the registry, Redis or the disk."""
    return isinstance(exc, (SQLAlchemyError, RedisError, OSError))


def _more(held: int) -> str:
    return f" ({held} more not logged)" if held else ""
