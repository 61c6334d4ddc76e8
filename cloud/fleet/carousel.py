"""One artifact's carousel: which chunks are wanted, and which one goes out next.

A reel keeps, for one artifact, the union of the chunk indices devices asked for, each with
the moment it was last asked for — per device only whether it asked in the last two passes.
Chunks go out in index order from a
cursor, round and round: each wanted chunk once per pass. Sending a chunk satisfies every
ask made before it (the broker hands it to every device subscribed); a device asking for a
chunk the cursor has passed gets it on the next pass, and a device that joins mid-pass gets
the rest of this pass and the start of the next. An ask nobody repeats within ``ttl_s``
stops being sent: the device that made it is gone, or will ask again. That time runs only
while no pass is under way (from the ask, or from the end of the pass it waited behind): a
device receiving a pass in order gains chunk after chunk and has no reason to ask again,
however long the pass lasts. A repeated ask that comes within ``grace_s`` of the chunk's
sending is not taken (see ``Pacing.grace_s``), nor one made only because the device heard
nothing for a while, for longer the more devices the chunk went to (``Pacing.fan_out_s``).

A pass waits for the devices still joining (a rollout's wave reaches its devices over
seconds): it starts once no device made its first ask for ``settle_s``, or ``max_wait_s``
after it became due, and at most once per ``pass_interval_s`` — so the devices of a wave
share a pass, and those that joined during one share the next, instead of each bringing one
of its own. A device that joined alone since the last pass waits only ``lone_settle_s``.

Pure bookkeeping (no I/O, no threads, no clock of its own): the broadcaster calls it under
its lock."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

__all__ = ["Pacing", "Reel"]


@dataclass(frozen=True)
class Pacing:
    """When a new pass over an artifact may start (see the module docstring)."""

    pass_interval_s: float = 1.0
    # Longer than the gaps between the devices of one wave reaching us: the rollout engine
    # signs a wave's documents a batch at a time, and the devices answer with jitter.
    settle_s: float = 2.0
    lone_settle_s: float = 0.2
    max_wait_s: float = 15.0
    # A repeated ask for a chunk sent this recently is not a want: the chunk is most likely
    # still on its way (a device asks again when it heard nothing for a while, and may do so
    # just as a pass begins); one truly lost is asked for again after this.
    grace_s: float = 2.0
    # A repeated ask from a device that heard nothing for a while (``passed_over`` False)
    # says nothing about a chunk sent recently: the broker hands a pass to each device in
    # turn, so the chunk is most likely still queued for it. Taken, it had the whole pass
    # sent again to a thousand devices about to receive it. How long the broker takes grows
    # with the devices it hands the chunk to (those that asked since the pass before began):
    # ``grace_s`` plus ``fan_out_s`` each, at most ``silence_grace_s``.
    silence_grace_s: float = 12.0
    fan_out_s: float = 0.01

    def __post_init__(self) -> None:
        if self.silence_grace_s < self.grace_s:
            raise ValueError("silence_grace_s must be at least grace_s")


@dataclass
class Reel:
    sha256: str
    chunk_size: int
    chunks: int
    # Wanted chunk index -> when it was last asked for (monotonic seconds).
    wanted: dict[int, float] = field(default_factory=dict)
    cursor: int = 0
    passes: int = 0
    # When the current pass began; the next may not begin before ``rest_until``.
    pass_started: float | None = None
    rest_until: float = 0.0
    touched: float = 0.0  # the last ask or send: an idle reel is forgotten after a while
    last_join: float = float("-inf")  # the last first ask of a device
    joins: int = 0  # first asks since the last pass began
    due_since: float | None = None  # when a next pass became due (wants left behind)
    pass_ended: float = float("-inf")  # when the last pass sent its last wanted chunk
    _order: list[int] = field(default_factory=list)  # ``wanted``'s keys, sorted
    _sent_at: dict[int, float] = field(default_factory=dict)  # chunk index -> last sent
    # Chunk index -> how many devices it went to when last sent: those that asked since the
    # pass before it began (a device receiving a pass does not ask again, so an ask older
    # than the pass is what shows it is downloading).
    _sent_to: dict[int, int] = field(default_factory=dict, repr=False)
    # Devices that asked between the last two pass starts, and since the current one began;
    # ``_audience`` counts both (no device twice).
    _asked_before: set[str] = field(default_factory=set, repr=False)
    _asking: set[str] = field(default_factory=set, repr=False)
    _audience: int = 0

    def ask(
        self,
        indices: list[int],
        now: float,
        pacing: Pacing,
        *,
        first: bool = False,
        passed_over: bool | None = None,
        device: str | None = None,
    ) -> int:
        """Note that someone lacks ``indices`` (``first``: a device's first ask, it joins;
        ``passed_over``: why it asks again, see ``ArtifactRequest``); returns how many were
        new wants. Indices beyond the artifact are ignored (a device cannot make us hold more
        than it has)."""
        added = 0
        if device is not None and device not in self._asking:
            self._asking.add(device)
            self._audience += device not in self._asked_before
        if not self._order and now - self.touched >= pacing.settle_s:
            self.pass_started = None  # idle a while: the next pass starts from the first index
        self.touched = max(self.touched, now)
        if first:
            self.last_join = max(self.last_join, now)
            self.joins += 1
        for index in indices:
            if not 0 <= index < self.chunks:
                continue
            if not first and now - self._sent_at.get(index, float("-inf")) < self._grace(
                index, pacing, silence=passed_over is False
            ):
                continue  # just sent: most likely on its way to the device that asks again
            if index not in self.wanted:
                bisect.insort(self._order, index)
                added += 1
            self.wanted[index] = now
        return added

    def next_index(self, now: float, pacing: Pacing) -> int | None:
        """The chunk to send now, or None: nothing wanted, or waiting for the next pass."""
        if not self._order:
            return None
        position = bisect.bisect_left(self._order, self.cursor)
        if position == len(self._order) or self.pass_started is None:
            # This pass is over (or none began yet): the next one starts from the first index.
            if self.wait_for_pass(now, pacing) > 0:
                return None
            self.cursor, position = 0, 0
            self._asked_before, self._asking = self._asking, set()
            self._audience = len(self._asked_before)
            self.passes += 1
            self.pass_started = now
            self.rest_until = now + pacing.pass_interval_s
            self.due_since = None
            self.joins = 0
        self.touched = max(self.touched, now)
        return self._order[position]

    def wait_for_pass(self, now: float, pacing: Pacing) -> float:
        """Seconds until a new pass may start (0: now)."""
        if self.due_since is None:
            self.due_since = now
        settle = pacing.settle_s if self.joins > 1 else pacing.lone_settle_s
        joining = min(self.last_join + settle - now, self.due_since + pacing.max_wait_s - now)
        return max(0.0, self.rest_until - now, joining)

    def _grace(self, index: int, pacing: Pacing, *, silence: bool) -> float:
        if not silence:
            return pacing.grace_s
        fan_out = pacing.grace_s + pacing.fan_out_s * self._sent_to.get(index, 0)
        return min(pacing.silence_grace_s, fan_out)

    def sent(self, index: int, now: float) -> None:
        """``index`` went out: every ask for it so far is answered; the pass moves on."""
        self._sent_at[index] = now
        self._sent_to[index] = self._audience
        if self.wanted.pop(index, None) is not None:
            del self._order[bisect.bisect_left(self._order, index)]
        self.cursor = index + 1
        if not self._under_way():
            self.pass_ended = now

    def _under_way(self) -> bool:
        """A pass runs and still has wanted chunks ahead of its cursor."""
        ahead = bisect.bisect_left(self._order, self.cursor) < len(self._order)
        return self.pass_started is not None and ahead

    def expire(self, older_than: float) -> int:
        """Forget asks that nobody repeated since ``older_than``, counting a want's age from
        the end of the pass it waited behind; while a pass is under way none (see the module
        docstring). Returns how many."""
        if self._under_way():
            return 0
        stale = [i for i, at in self.wanted.items() if max(at, self.pass_ended) < older_than]
        for index in stale:
            del self.wanted[index]
            del self._order[bisect.bisect_left(self._order, index)]
        return len(stale)

    def resting(self, now: float, pacing: Pacing) -> float | None:
        """Seconds until this reel may send again (None: nothing wanted)."""
        if not self._order:
            return None
        if bisect.bisect_left(self._order, self.cursor) < len(self._order):
            return 0.0
        return self.wait_for_pass(now, pacing)
