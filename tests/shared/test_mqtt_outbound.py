"""Counting what the broker has not acknowledged, whichever thread gets there first."""

from __future__ import annotations

import pytest

from shared import mqtt_outbound
from shared.mqtt_outbound import Unacknowledged


def test_a_message_counts_from_its_send_to_its_ack() -> None:
    out = Unacknowledged()
    out.sent(1)
    out.sent(2)
    assert out.count == 2
    out.acked(1)
    assert out.count == 1


def test_an_ack_before_its_send_cancels_it() -> None:
    """The network thread saw the PUBACK before publish() returned on the sending thread:
    the message never counts."""
    out = Unacknowledged()
    out.acked(7)
    out.sent(7)
    assert out.count == 0


def test_an_ack_nobody_claims_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho reports QoS 0 messages as written (their ids are never sent here): after a
    moment such an id is forgotten, and a later QoS 1 message reusing it counts."""
    now = [100.0]
    monkeypatch.setattr(mqtt_outbound.time, "monotonic", lambda: now[0])
    out = Unacknowledged()
    out.acked(3)
    now[0] += 5.0
    out.acked(4)  # any later ack clears the old ones
    out.sent(3)
    assert out.count == 1
