"""Fetch an artifact into the ModelStore: over MQTT (ask for missing chunks, receive them on
`artifacts/{sha256}/{index}`) or over HTTP with Range. Both resume from what is on disk."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import httpx

from edge_agent.model_store import ModelStore
from shared import topics
from shared.errors import IntegrityError, ServiceUnavailable
from shared.messages import ArtifactRef, ArtifactRequest
from shared.mqtt_link import MqttLink
from shared.retry import Backoff
from shared.topics import DeviceTopic

__all__ = ["HttpDelivery", "MqttDelivery", "Progress"]

_LOGGER = logging.getLogger(__name__)

Progress = Callable[[int], None]  # bytes done so far
_STOP_POLL_S = 0.2
_PROGRESS_S = 0.5  # how often a download under way says how far it is, at most


class MqttDelivery:
    """Many devices asking for the same chunks share one broadcast: the cloud's carousel
    sends each wanted chunk once per pass, to every device subscribed.

    A device asks for everything it lacks at once, then lets the carousel come round: it asks
    again only once no chunk of the artifact arrived for ``wait_s`` (jittered, so a fleet does
    not ask in step), or none it lacked for ``patience`` times that. Asking again for a chunk
    already on its way (queued by the broker behind others) would have it sent twice, so such
    an ask says it comes of silence (``passed_over`` False), and the cloud sends a chunk it
    sent moments ago again only when a gap shows it lost (``passed_over`` True).

    A pass goes up the indices: a chunk arriving while one below it is still missing shows
    that one was lost (or not in this pass), and the device asks again ``skip_delay_s`` later
    — beyond the cloud's grace for repeated asks (``cloud/fleet/carousel.py``, 2 s) — for
    that gap only, and for each missing chunk at most once a pass (a chunk arriving below
    the last one heard begins the next pass): a device that joined mid-pass would otherwise
    ask for all it lacks again at every arrival until the pass ends.

    It gives up after ``max_stalls`` asks without a new chunk, and never before ``give_up_s``
    without one: the cloud may hold a pass back for a wave still joining (at most
    ``chunk_pass_max_wait_s``, which its settings keep below this), and a device that asks
    again every second while it waits would otherwise count its stalls up meanwhile."""

    def __init__(
        self,
        link: MqttLink,
        store: ModelStore,
        *,
        device_id: str,
        request_window: int = 1024,
        wait_s: float = 3.0,
        max_stalls: int = 8,
        backoff: Backoff | None = None,
        patience: float = 4.0,
        skip_delay_s: float = 2.5,
        give_up_s: float = 30.0,
        presume_lost_s: float = 12.0,
        rng: random.Random | None = None,
    ) -> None:
        self.link = link
        self.store = store
        self.device_id = device_id
        self.request_window = request_window  # chunk indices per request message
        self.wait_s = wait_s
        self.max_stalls = max_stalls
        self.backoff = backoff or Backoff(base=0.2, cap=10.0)
        self.patience = patience
        self.skip_delay_s = skip_delay_s
        self.give_up_s = give_up_s
        # Asks of silence this long after the last chunk gained say the chunks were lost:
        # the cloud would go on taking them for chunks still queued (its silence grace, at
        # most 12 s), and a device that lost its last chunk has no gap to show.
        self.presume_lost_s = presume_lost_s
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._arrived = threading.Condition()
        self._active: dict[str, ArtifactRef] = {}
        # Per artifact being fetched: when a chunk of it last arrived, one we lacked, and
        # (since the last ask) one above a gap not asked for yet, with its index.
        self._heard: dict[str, float] = {}
        self._gained: dict[str, float] = {}
        self._skipped: dict[str, tuple[float, int]] = {}
        # This pass: the last index heard; the gaps below ``_asked_below`` were asked for;
        # every chunk from there up to ``_present_to`` is on disk (so each arrival looks at
        # the chunks below it once, not all of them again).
        self._top: dict[str, int] = {}
        self._asked_below: dict[str, int] = {}
        self._present_to: dict[str, int] = {}
        self.rejected_chunks = 0
        self.requests = 0

    def _on_chunk(self, topic: str, payload: bytes) -> None:
        parsed = topics.parse(topic)
        ref = self._active.get(parsed.sha256 or "")
        if ref is None or parsed.chunk_index is None:
            return
        self.store_chunk(ref, parsed.chunk_index, payload)

    def store_chunk(self, ref: ArtifactRef, index: int, payload: bytes) -> None:
        """Keep one received chunk (checked against its hash) and wake the fetch."""
        now = time.monotonic()
        lacked = not self.store.has_chunk(ref, index)
        if lacked and not self.store.write_chunk(ref, index, payload):
            self.rejected_chunks += 1
            lacked = False
            _LOGGER.warning(
                "chunk %s of %s failed its hash; will ask again", index, ref.sha256[:12]
            )
        sha = ref.sha256
        with self._arrived:
            self._heard[sha] = now
            if lacked:
                self._gained[sha] = now
            if index < self._top.get(sha, -1):
                # The carousel came round: the gaps of this new pass were not asked for yet.
                self._asked_below[sha] = self._present_to[sha] = 0
            self._top[sha] = index
            if self._new_gap(ref, index):
                self._skipped.setdefault(sha, (now, index))
            self._arrived.notify_all()

    def _new_gap(self, ref: ArtifactRef, index: int) -> bool:
        """A chunk below ``index`` is missing that no ask of this pass covered (under
        ``_arrived``)."""
        sha = ref.sha256
        start = max(self._asked_below.get(sha, 0), self._present_to.get(sha, 0))
        for below in range(start, index):
            if not self.store.has_chunk(ref, below):
                self._present_to[sha] = below
                return True
        self._present_to[sha] = max(start, index)
        return False

    def fetch(self, ref: ArtifactRef, progress: Progress, stop: threading.Event) -> None:
        chunk_filter = topics.artifact_chunks_filter(ref.sha256)
        self._active[ref.sha256] = ref
        self.link.subscribe(chunk_filter, self._on_chunk, qos=1)
        try:
            self._fetch(ref, progress, stop)
        finally:
            self.link.unsubscribe(chunk_filter)
            self._active.pop(ref.sha256, None)
            with self._arrived:
                for seen in (
                    self._heard, self._gained, self._skipped, self._top, self._asked_below,
                    self._present_to,
                ):  # fmt: skip
                    seen.pop(ref.sha256, None)

    def _ask(
        self,
        ref: ArtifactRef,
        missing: list[int],
        *,
        first: bool,
        gap: int | None = None,
        lost: bool = False,
    ) -> bool:
        """Ask for ``missing``; or, with ``gap``, for those of them below it that no ask of
        this pass covered yet. ``lost``: the chunks are known (a gap) or presumed lost."""
        if not self.link.connected:
            return False
        topic = topics.device_topic(self.device_id, DeviceTopic.ARTIFACT_REQUEST)
        with self._arrived:
            self._skipped.pop(ref.sha256, None)
            if gap is not None:
                asked = self._asked_below.get(ref.sha256, 0)
                missing = [i for i in missing if asked <= i < gap]
                self._asked_below[ref.sha256] = max(asked, gap)
        for start in range(0, len(missing), self.request_window):
            request = ArtifactRequest(
                sha256=ref.sha256,
                chunks=missing[start : start + self.request_window],
                first=first and start == 0,  # one join, however many messages it takes
                # A gap under a chunk that arrived was lost; silence may be a queue.
                passed_over=None if first else lost,
            )
            self.link.publish(topic, request.model_dump_json(), qos=1)
        self.requests += 1
        return True

    def _fetch(self, ref: ArtifactRef, progress: Progress, stop: threading.Event) -> None:
        stalls = 0
        first = True
        gained = time.monotonic()
        gap: int | None = None
        while not stop.is_set():
            missing = self.store.missing_chunks(ref)
            if not missing:
                return
            before = len(missing)
            lost = gap is not None or time.monotonic() - gained >= self.presume_lost_s
            if self._ask(ref, missing, first=first, gap=gap, lost=lost):
                first = False
            gap = self._wait_for_the_carousel(ref, stop, progress)
            now_missing = len(self.store.missing_chunks(ref))
            progress(self.store.bytes_done(ref))
            if now_missing < before:
                stalls = 0
                gained = time.monotonic()
                continue
            stalls += 1
            silent = time.monotonic() - gained
            if stalls >= self.max_stalls and silent >= self.give_up_s:
                raise ServiceUnavailable(
                    f"download stalled: {now_missing} of {len(ref.chunks)} chunks missing after "
                    f"{stalls} requests and {silent:.0f}s without a new chunk "
                    f"({self.rejected_chunks} chunks failed their hash)"
                )
            stop.wait(self.backoff.delay(stalls))

    def _wait_for_the_carousel(
        self, ref: ArtifactRef, stop: threading.Event, progress: Progress
    ) -> int | None:
        """Until nothing is missing, or it is time to ask again (see the class docstring):
        for a gap below the index returned, or (None) for everything missing. Progress is
        said along the way (every ``_PROGRESS_S`` at most), not only when the wait ends: a
        carousel that keeps delivering may keep it going for the whole download."""
        quiet = self.wait_s * self.rng.uniform(0.75, 1.25)
        start = time.monotonic()
        said = start
        while not stop.is_set():
            with self._arrived:
                if self.store.complete(ref):
                    return None
                now = time.monotonic()
                heard = max(start, self._heard.get(ref.sha256, start))
                gained = max(start, self._gained.get(ref.sha256, start))
                due = min(heard + quiet, gained + quiet * self.patience)
                if due <= now:
                    return None
                skipped = self._skipped.get(ref.sha256)
                if skipped is not None:
                    if skipped[0] + self.skip_delay_s <= now:
                        return skipped[1]
                    due = min(due, skipped[0] + self.skip_delay_s)
                # In slices: ``stop`` is an Event of the deployer's, which cannot notify us.
                self._arrived.wait(min(due - now, _STOP_POLL_S))
            if time.monotonic() - said >= _PROGRESS_S:
                said = time.monotonic()
                progress(self.store.bytes_done(ref))  # outside the lock: it publishes
        return None


class HttpDelivery:
    """`GET /v1/artifacts/{sha256}` with `Range`, from the first missing chunk on."""

    def __init__(
        self,
        store: ModelStore,
        *,
        cloud_url: str,
        token: str,
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.store = store
        self.cloud_url = cloud_url.rstrip("/")
        self._client = httpx.Client(
            headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s, transport=transport
        )

    def close(self) -> None:
        self._client.close()

    def fetch(self, ref: ArtifactRef, progress: Progress, stop: threading.Event) -> None:
        missing = self.store.missing_chunks(ref)
        if not missing:
            return
        start = missing[0] * ref.chunk_size
        headers = {"Range": f"bytes={start}-"}
        url = f"{self.cloud_url}/v1/artifacts/{ref.sha256}"
        try:
            with self._client.stream("GET", url, headers=headers) as response:
                if response.status_code not in (200, 206):
                    raise ServiceUnavailable(f"artifact download answered {response.status_code}")
                index = missing[0] if response.status_code == 206 else 0
                buffer = b""
                for block in response.iter_bytes(1 << 16):
                    if stop.is_set():
                        return
                    buffer += block
                    while index < len(ref.chunks):
                        size = min(ref.chunk_size, ref.size - index * ref.chunk_size)
                        if len(buffer) < size:
                            break
                        piece, buffer = buffer[:size], buffer[size:]
                        if not self.store.write_chunk(ref, index, piece):
                            raise IntegrityError(f"chunk {index} from HTTP failed its hash")
                        index += 1
                        progress(self.store.bytes_done(ref))
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(f"artifact download failed: {exc}") from exc
