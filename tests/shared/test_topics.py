"""Topic templates and parsers."""

from __future__ import annotations

import pytest

from shared import topics
from shared.errors import ProtocolError
from shared.topics import DeviceTopic

SHA = "a" * 64


@pytest.mark.parametrize("kind", list(DeviceTopic))
def test_every_device_topic_round_trips(kind: DeviceTopic) -> None:
    """A device topic built by the template parses back to its device and kind."""
    topic = topics.device_topic("cam-01", kind)
    parsed = topics.parse(topic)
    assert topic.startswith("edgefleet/v1/dev/cam-01/")
    assert (parsed.kind, parsed.device_id) == (kind, "cam-01")


def test_artifact_chunk_round_trips() -> None:
    parsed = topics.parse(topics.artifact_chunk(SHA, 12))
    assert (parsed.sha256, parsed.chunk_index, parsed.kind) == (SHA, 12, None)
    assert topics.artifact_chunks_filter(SHA) == f"edgefleet/v1/artifacts/{SHA}/+"


def test_fleet_filters_cover_all_devices_and_can_be_shared() -> None:
    assert topics.fleet_filter(DeviceTopic.STATUS) == "edgefleet/v1/dev/+/status"
    assert topics.fleet_filter(DeviceTopic.STATUS, shared=True) == (
        "$share/edgefleet-cloud/edgefleet/v1/dev/+/status"
    )


@pytest.mark.parametrize("device_id", ["", "a/b", "+", "#", "dev+1", "x" * 65, ".hidden", "é"])
def test_device_ids_that_would_break_topics_or_paths_are_refused(device_id: str) -> None:
    with pytest.raises(ProtocolError):
        topics.device_topic(device_id, DeviceTopic.STATUS)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/dev/a/status",
        "edgefleet/v1/dev/a/unknown",
        "edgefleet/v1/dev/a",
        f"edgefleet/v1/artifacts/{SHA}/x",
        "edgefleet/v1/artifacts/ABC/1",
        "edgefleet/v1/nothing",
    ],
)
def test_foreign_or_malformed_topics_are_refused(topic: str) -> None:
    with pytest.raises(ProtocolError):
        topics.parse(topic)
