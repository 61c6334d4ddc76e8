"""How the fleet gateway reads a request body: within its limits (size, a wait for each part,
a deadline, a lowest average rate), and into memory before a SuperLink connection is taken,
so that a slow client holds a connection of the gateway's, never one of the SuperLink's.

Flower's calls are small but for push-object (an array chunk of at most 5 MiB) and a FAB:
a body up to ``buffer_bytes`` is read whole first, under a byte budget all requests share;
a larger one, or one that finds the budget spent, streams on past what was read.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import ClientDisconnect
from starlette.types import Receive

__all__ = ["BodyBudget", "BodyLimits", "BodyReader", "BodyRefused", "Buffered", "read_ahead"]


@dataclass(frozen=True, slots=True)
class BodyLimits:
    max_bytes: int
    # A wait for the next part, the whole body, and the average rate it must keep from the
    # request head on, once the grace period is over (0: no such rule).
    idle_s: float
    deadline_s: float
    min_rate: float
    grace_s: float


class BodyRefused(Exception):
    """The request body broke a limit; the answer the client gets."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyBudget:
    """The bytes of request bodies the gateway holds in memory, every request together (one
    event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


class BodyReader:
    """The body's parts as they come, each wait bounded by what is left of the idle time,
    the deadline and the rate rule, all started when the request was."""

    def __init__(self, receive: Receive, limits: BodyLimits) -> None:
        self.receive = receive
        self.limits = limits
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.deadline = self.started + limits.deadline_s
        self.size = 0
        self.done = False

    def _rate_due(self) -> float:
        """When the body's average rate falls below the floor if nothing more comes."""
        if self.limits.min_rate <= 0:
            return float("inf")
        return self.started + max(self.limits.grace_s, self.size / self.limits.min_rate)

    async def next(self) -> bytes | None:
        """The next part, or None once the body is all in."""
        while not self.done:
            now = self.loop.time()
            wait = min(self.limits.idle_s, self.deadline - now, self._rate_due() - now)
            try:
                message = await asyncio.wait_for(self.receive(), max(wait, 0.0))
            except TimeoutError:
                raise self._late() from None
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk: bytes = message.get("body", b"")
            self.size += len(chunk)
            if self.size > self.limits.max_bytes:
                raise BodyRefused(413, f"the request body is over {self.limits.max_bytes} bytes")
            self.done = not message.get("more_body", False)
            if chunk:
                return chunk
        return None

    def _late(self) -> BodyRefused:
        now = self.loop.time()
        if now >= self.deadline:
            return BodyRefused(408, f"the request body took over {self.limits.deadline_s:g}s")
        if now >= self._rate_due():
            slow = f"the request body came slower than {self.limits.min_rate:g} bytes/s"
            return BodyRefused(408, slow)
        return BodyRefused(408, "the request body stopped coming")


@dataclass(slots=True)
class Buffered:
    """What was read before the SuperLink was asked: the whole body (``complete``) or its
    start, and the bytes of the budget it holds until the request is sent on."""

    parts: deque[bytes]
    complete: bool
    reserved: int

    def content(self, reader: BodyReader) -> AsyncIterator[bytes]:
        """The body for the upstream request: what was read (each part let go of once sent),
        then the rest as it comes."""

        async def parts() -> AsyncIterator[bytes]:
            while self.parts:
                yield self.parts.popleft()
            while (chunk := await reader.next()) is not None:
                yield chunk

        return parts()


async def read_ahead(reader: BodyReader, budget: BodyBudget, most: int) -> Buffered:
    """Read the body into memory up to ``most`` bytes while the budget has room for them."""
    buffered = Buffered(deque(), complete=False, reserved=0)
    try:
        while (chunk := await reader.next()) is not None:
            buffered.parts.append(chunk)
            if reader.size > most or not budget.take(len(chunk)):
                return buffered  # streams on from here
            buffered.reserved += len(chunk)
        buffered.complete = True
        return buffered
    except BaseException:
        budget.give(buffered.reserved)
        raise
