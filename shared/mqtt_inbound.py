"""What a link hands its receivers: plain handlers, :class:`Inbound` messages that they
acknowledge themselves once safe, and the topic-filter matching that routes to them."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["Acker", "Handler", "Inbound", "InboundHandler", "ack_all", "topic_matches"]

Handler = Callable[[str, bytes], None]


class Acker(Protocol):
    """Who acknowledges an :class:`Inbound` (the link that received it)."""

    def ack_many(self, items: Sequence[Inbound]) -> None: ...


@dataclass(frozen=True, slots=True)
class Inbound:
    """A received message whose acknowledgement is the receiver's to send, once it is safe."""

    topic: str
    payload: bytes
    qos: int
    received_at: float  # time.monotonic() on arrival
    acker: Acker = field(repr=False)
    mid: int = 0
    generation: int = 0  # the connection it came on

    def ack(self) -> None:
        """Tell the broker it may forget this message (a no-op for QoS 0)."""
        self.acker.ack_many((self,))


def ack_all(items: Iterable[Inbound]) -> None:
    """Acknowledge many messages at once: their link writes the PUBACKs in one go."""
    groups: dict[int, tuple[Acker, list[Inbound]]] = {}
    for item in items:
        groups.setdefault(id(item.acker), (item.acker, []))[1].append(item)
    for acker, group in groups.values():
        acker.ack_many(group)


InboundHandler = Callable[[Inbound], None]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (``$share/group/`` ignored), compiled once per filter: paho's
    ``topic_matches_sub`` builds a matcher on every call, microseconds on each message."""
    return _compiled(pattern).fullmatch(topic) is not None


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    if pattern.startswith("$share/"):
        pattern = pattern.split("/", 2)[2]
    levels = pattern.split("/")
    parts = []
    for index, level in enumerate(levels):
        if level == "#" and index == len(levels) - 1:
            # "a/#" matches "a" too; a lone "#" matches everything (but see $ below).
            parts.append("(?:/.*)?" if index else ".*")
            continue
        sep = "/" if index else ""
        parts.append(sep + ("[^/]*" if level == "+" else re.escape(level)))
    regex = "".join(parts)
    if levels[0] in ("+", "#"):
        regex = r"(?!\$)" + regex  # a leading wildcard never matches $SYS topics (MQTT 4.7.2)
    return re.compile(regex, re.DOTALL)
