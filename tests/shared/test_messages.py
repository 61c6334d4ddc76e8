"""Protocol messages: strict, versioned, self-consistent."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest

from shared.errors import ProtocolError, UnsupportedSchema
from shared.messages import (
    ArtifactRef,
    ArtifactRequest,
    DesiredState,
    Histogram,
    Manifest,
    Presence,
    PresenceState,
    StatusEvent,
    decode,
)


def artifact(size: int = 10_000, chunk_size: int = 4096) -> ArtifactRef:
    count = -(-size // chunk_size)
    return ArtifactRef(
        sha256="0" * 64,
        size=size,
        chunk_size=chunk_size,
        chunks=[hashlib.sha256(str(i).encode()).hexdigest() for i in range(count)],
    )


def manifest(model: str = "digits", version: int = 1) -> Manifest:
    return Manifest.model_validate(
        {
            "model": model,
            "version": version,
            "precision": "int8",
            "artifact": artifact().model_dump(),
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
            "routing": {
                "policy": "max_prob",
                "threshold": 0.8,
                "cloud_model": {"name": "digits-cloud", "version": 3},
            },
        }
    )


def test_manifest_round_trips_through_json() -> None:
    original = manifest()
    assert decode(Manifest, original.model_dump_json()) == original
    assert original.schema_version == 1


def test_unknown_fields_are_ignored_when_reading_at_every_level() -> None:
    """A newer cloud adds fields (top level and nested): an older reader takes the message."""
    raw = manifest().model_dump(mode="json")
    raw["added_in_a_later_minor"] = {"anything": [1, 2]}
    raw["artifact"]["mirror_url"] = "https://example.invalid/a"
    raw["routing"]["cloud_model"]["region"] = "eu"  # a field inside a field added later
    raw["inputs"][0]["layout"] = "NC"

    read = decode(Manifest, json.dumps(raw))

    assert read == manifest()


def test_writers_stay_strict() -> None:
    """Code that builds a message with a field the protocol lacks is a bug: refused."""
    with pytest.raises(ValueError, match="surprise"):
        Presence.model_validate({"state": "online", "surprise": 1})


def test_a_future_schema_version_is_refused() -> None:
    """A newer *major* version is refused with a reason, even when its shape differs too."""
    with pytest.raises(UnsupportedSchema, match="schema_version 2 is newer than this reader's 1"):
        decode(Presence, '{"schema_version": 2, "state": "online"}')
    with pytest.raises(UnsupportedSchema, match="schema_version 3"):
        decode(StatusEvent, '{"schema_version": 3, "phase": "renamed-field"}')


def test_an_older_or_current_schema_version_is_read() -> None:
    assert decode(Presence, '{"schema_version": 1, "state": "online"}').schema_version == 1
    assert decode(Presence, '{"state": "stopped"}').state is PresenceState.STOPPED
    with pytest.raises(ProtocolError, match="schema_version"):
        decode(Presence, '{"schema_version": 0, "state": "online"}')


def test_a_removal_is_read_and_a_state_this_reader_does_not_know_is_a_protocol_error() -> None:
    """REMOVED is read; a state newer than the reader (what REMOVED is to a cloud from before
    it) is a ProtocolError, which ingest logs, counts and acks: one status lost, nothing else."""
    at = '"at": "2026-01-01T00:00:00Z"'
    removed = decode(
        StatusEvent, f'{{"rev": 4, "model": "m", "version": 2, "state": "REMOVED", {at}}}'
    )
    assert (removed.state.value, removed.rollout_id, removed.version) == ("REMOVED", None, 2)
    with pytest.raises(ProtocolError, match="bad StatusEvent: state"):
        decode(StatusEvent, f'{{"rev": 4, "model": "m", "state": "ARCHIVED", {at}}}')


def test_malformed_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        decode(StatusEvent, b"\xff{not json")


def test_chunk_hashes_must_cover_the_artifact_exactly() -> None:
    good = artifact()
    with pytest.raises(ValueError, match="expected 3"):
        ArtifactRef(sha256=good.sha256, size=good.size, chunk_size=4096, chunks=good.chunks[:2])


def test_desired_state_allows_one_deployment_per_model_and_a_real_lifetime() -> None:
    now = datetime.now(UTC)
    dep = {"manifest": manifest().model_dump()}
    with pytest.raises(ValueError, match="one deployment per model"):
        DesiredState.model_validate(
            {
                "device_id": "d1",
                "rev": 1,
                "issued_at": now,
                "expires_at": now + timedelta(hours=1),
                "deployments": [dep, dep],
            }
        )
    with pytest.raises(ValueError, match="expires_at"):
        DesiredState(device_id="d1", rev=1, issued_at=now, expires_at=now)


def test_histogram_needs_one_more_count_than_bounds() -> None:
    Histogram(bounds=[1.0, 5.0], counts=[1, 2, 3])
    with pytest.raises(ValueError, match="one more entry"):
        Histogram(bounds=[1.0, 5.0], counts=[1, 2])


def test_artifact_request_refuses_negative_and_empty_chunk_lists() -> None:
    with pytest.raises(ProtocolError):
        decode(ArtifactRequest, '{"sha256": "' + "a" * 64 + '", "chunks": []}')
    with pytest.raises(ProtocolError):
        decode(ArtifactRequest, '{"sha256": "' + "a" * 64 + '", "chunks": [-1]}')
