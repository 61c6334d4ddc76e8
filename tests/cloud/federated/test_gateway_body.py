"""The gateway's read-ahead of request bodies: a small body is read whole under the shared
byte budget, a large one (or one that finds the budget spent) streams on past what was read,
and what a request took of the budget goes back whatever happens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from starlette.types import Message, Receive

from cloud.federated.gateway_body import (
    BodyBudget,
    BodyLimits,
    BodyReader,
    BodyRefused,
    Buffered,
    read_ahead,
)

LIMITS = BodyLimits(max_bytes=1000, idle_s=5, deadline_s=5, min_rate=0, grace_s=0)


def _receive(parts: Iterable[bytes]) -> Receive:
    messages: list[Message] = [
        {"type": "http.request", "body": part, "more_body": True} for part in parts
    ]
    messages.append({"type": "http.request", "body": b"", "more_body": False})

    async def receive() -> Message:
        return messages.pop(0)

    return receive


async def _sent(buffered: Buffered, reader: BodyReader) -> bytes:
    return b"".join([chunk async for chunk in buffered.content(reader)])


def test_a_small_body_is_read_whole_under_the_budget() -> None:
    async def scenario() -> tuple[Buffered, int, bytes]:
        budget = BodyBudget(100)
        reader = BodyReader(_receive([b"abc", b"defg"]), LIMITS)
        buffered = await read_ahead(reader, budget, most=50)
        held = budget.held
        return buffered, held, await _sent(buffered, reader)

    buffered, held, sent = asyncio.run(scenario())

    assert buffered.complete
    assert buffered.reserved == held == 7
    assert sent == b"abcdefg"


@pytest.mark.parametrize(("most", "budget_bytes"), [(5, 100), (50, 5)])
def test_past_the_read_ahead_or_the_budget_the_body_streams_on(
    most: int, budget_bytes: int
) -> None:
    """Past ``most`` bytes, or past what the budget has room for, the rest is read as it is
    sent on; the budget holds only the parts it took."""

    async def scenario() -> tuple[Buffered, int, bytes]:
        budget = BodyBudget(budget_bytes)
        reader = BodyReader(_receive([b"abc", b"defg", b"hi"]), LIMITS)
        buffered = await read_ahead(reader, budget, most=most)
        held = budget.held
        return buffered, held, await _sent(buffered, reader)

    buffered, held, sent = asyncio.run(scenario())

    assert not buffered.complete
    assert buffered.reserved == held == 3
    assert sent == b"abcdefghi"


def test_a_body_refused_while_read_ahead_gives_its_budget_back() -> None:
    async def scenario() -> int:
        budget = BodyBudget(10_000)
        reader = BodyReader(_receive([b"x" * 600, b"y" * 600]), LIMITS)
        with pytest.raises(BodyRefused) as refused:
            await read_ahead(reader, budget, most=5000)
        assert refused.value.status == 413
        return budget.held

    assert asyncio.run(scenario()) == 0
