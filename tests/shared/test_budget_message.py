"""The cloud budget on the wire: its topic, its payload (empty clears it), tolerant reading,
and the budget an agent reports in its telemetry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from shared import topics
from shared.errors import ProtocolError, UnsupportedSchema
from shared.messages import (
    BudgetReport,
    CloudBudget,
    Telemetry,
    budget_payload,
    decode,
    read_budget,
)

UNTIL = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_the_topic_is_the_one_design_names_and_every_device_shares() -> None:
    assert topics.CLOUD_BUDGET == "edgefleet/v1/cloud/budget"
    assert topics.CLOUD_BUDGET.startswith(topics.PREFIX)


def test_a_budget_round_trips_and_the_empty_payload_clears_it() -> None:
    budget = CloudBudget(max_offload=0.25, reason="queue 240 ms over 100 ms", until=UNTIL)
    assert read_budget(budget_payload(budget)) == budget
    assert budget_payload(None) == b""
    assert read_budget(b"") is None
    assert read_budget(b"  \n") is None


def test_a_reader_ignores_fields_it_does_not_know_and_refuses_a_newer_major() -> None:
    """A newer cloud adds a field: this agent still follows the budget. A newer major
    version is refused by name, not misread."""
    newer = {"max_offload": 0.1, "until": UNTIL.isoformat(), "priority": "high", "reason": ""}
    assert read_budget(json.dumps(newer).encode()) == CloudBudget(max_offload=0.1, until=UNTIL)
    with pytest.raises(UnsupportedSchema, match="newer"):
        read_budget(json.dumps({**newer, "schema_version": 2}).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b'{"max_offload": 1.5, "until": "2030-01-01T00:00:00Z"}',
        b'{"max_offload": -0.1, "until": "2030-01-01T00:00:00Z"}',
        b'{"max_offload": 0.5}',
        b'{"until": "2030-01-01T00:00:00Z"}',
        b'{"max_offload": "half", "until": "2030-01-01T00:00:00Z"}',
    ],
    ids=["not-json", "over-one", "negative", "no-until", "no-share", "not-a-number"],
)
def test_a_malformed_budget_is_a_clear_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="CloudBudget"):
        read_budget(payload)


def test_a_budget_may_say_how_long_to_follow_it_and_an_older_one_does_not() -> None:
    """``ttl_s`` and ``issued_at`` are optional: a budget from an older cloud reads with
    None (follow it until ``until``); a TTL that is not positive is refused."""
    issued = UNTIL - timedelta(seconds=30)
    budget = CloudBudget(max_offload=0.25, until=UNTIL, ttl_s=30.0, issued_at=issued)
    assert read_budget(budget_payload(budget)) == budget
    old = read_budget(b'{"max_offload": 0.25, "until": "2030-01-02T03:04:05Z"}')
    assert old is not None
    assert (old.ttl_s, old.issued_at) == (None, None)
    naive = read_budget(
        b'{"max_offload": 0.25, "until": "2030-01-02T03:04:05Z", "ttl_s": 30,'
        b' "issued_at": "2030-01-02T03:03:35"}'
    )
    assert naive is not None
    assert naive.issued_at == issued
    with pytest.raises(ProtocolError, match="ttl_s"):
        read_budget(b'{"max_offload": 0.25, "until": "2030-01-02T03:04:05Z", "ttl_s": 0}')


def test_a_writer_is_strict_and_a_time_without_a_zone_is_read_as_utc() -> None:
    with pytest.raises(ValidationError):
        CloudBudget(max_offload=0.5, until=UNTIL, priority="high")  # type: ignore[call-arg]
    naive = decode(CloudBudget, b'{"max_offload": 0.5, "until": "2030-01-02T03:04:05"}')
    assert naive.until == UNTIL


def test_telemetry_carries_the_budget_in_force_and_older_readers_skip_it() -> None:
    """New optional field: a window without it means no budget (what an older agent sends),
    and a reader that does not know it still reads the rest."""
    report = BudgetReport(
        max_offload=0.2, reason="queue", until=UNTIL, following=["digits-edge"], fixed=["text"]
    )
    window = Telemetry(window_s=5, counts={"rows_total": 10}, at=UNTIL, budget=report)
    assert decode(Telemetry, window.model_dump_json()).budget == report
    old = Telemetry(window_s=5, at=UNTIL - timedelta(days=1))
    assert decode(Telemetry, old.model_dump_json()).budget is None
    as_older = json.loads(window.model_dump_json())
    as_older["budget"]["new_thing"] = 1
    assert decode(Telemetry, json.dumps(as_older)).budget == report
