"""Ed25519 signing of desired-state documents: only the pinned key's fresh documents pass."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.errors import ExpiredDocument, ProtocolError, SignatureError, UnsupportedSchema
from shared.messages import DesiredState
from shared.signing import (
    SignedEnvelope,
    generate_key,
    key_id,
    load_or_create_private_key,
    load_public_key,
    public_key_b64,
    sign,
    verify_desired_state,
)


def desired(rev: int = 3, *, lifetime: timedelta = timedelta(hours=1)) -> DesiredState:
    now = datetime.now(UTC)
    return DesiredState(device_id="cam-1", rev=rev, issued_at=now, expires_at=now + lifetime)


def test_a_signed_document_verifies_with_the_pinned_key() -> None:
    key = generate_key()
    envelope = sign(desired(), key)
    state = verify_desired_state(envelope.model_dump_json(), key.public_key(), device_id="cam-1")
    assert state.rev == 3


def test_a_tampered_payload_is_rejected() -> None:
    """Prepare a valid document, raise its rev inside the payload, keep the old signature."""
    key = generate_key()
    envelope = sign(desired(rev=3), key)
    body = json.loads(base64.b64decode(envelope.payload))
    body["rev"] = 99
    tampered = envelope.model_copy(
        update={"payload": base64.b64encode(json.dumps(body).encode()).decode()}
    )
    with pytest.raises(SignatureError, match="does not verify"):
        verify_desired_state(tampered, key.public_key(), device_id="cam-1")


def test_a_document_signed_by_another_key_is_rejected() -> None:
    envelope = sign(desired(), generate_key())
    with pytest.raises(SignatureError, match="unknown key"):
        verify_desired_state(envelope, generate_key().public_key(), device_id="cam-1")


def test_a_forged_key_id_does_not_help() -> None:
    pinned, attacker = generate_key(), generate_key()
    forged = sign(desired(), attacker).model_copy(update={"key_id": sign(desired(), pinned).key_id})
    with pytest.raises(SignatureError, match="does not verify"):
        verify_desired_state(forged, pinned.public_key(), device_id="cam-1")


def test_an_expired_document_is_rejected() -> None:
    key = generate_key()
    envelope = sign(desired(lifetime=timedelta(seconds=1)), key)
    later = datetime.now(UTC) + timedelta(seconds=5)
    with pytest.raises(ExpiredDocument):
        verify_desired_state(envelope, key.public_key(), device_id="cam-1", now=later)


def test_a_document_for_another_device_is_rejected() -> None:
    key = generate_key()
    with pytest.raises(SignatureError, match="not 'cam-2'"):
        verify_desired_state(sign(desired(), key), key.public_key(), device_id="cam-2")


def test_a_document_issued_in_the_future_is_rejected() -> None:
    key = generate_key()
    early = datetime.now(UTC) - timedelta(hours=2)
    with pytest.raises(SignatureError, match="future"):
        verify_desired_state(sign(desired(), key), key.public_key(), device_id="cam-1", now=early)


@pytest.mark.parametrize("raw", [b"not json", b"{}", b'{"payload": 1}'])
def test_a_malformed_envelope_is_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        verify_desired_state(raw, generate_key().public_key(), device_id="cam-1")


def test_bad_base64_is_a_signature_error() -> None:
    key = generate_key()
    envelope = SignedEnvelope(payload="***", signature="***", key_id="x")
    with pytest.raises(SignatureError):
        verify_desired_state(envelope, key.public_key(), device_id="cam-1")


def test_the_signing_key_is_created_once_private_and_reused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "keys" / "k.pem"
    first = load_or_create_private_key(path)
    second = load_or_create_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_key_b64(first.public_key()) == public_key_b64(second.public_key())
    assert load_public_key(public_key_b64(first.public_key()))


def test_a_garbage_public_key_is_refused() -> None:
    with pytest.raises(SignatureError):
        load_public_key("bm90IGEga2V5")


def _signed_raw(body: dict[str, object], key: Ed25519PrivateKey) -> bytes:
    """Sign ``body`` as a newer cloud would: its own canonical JSON, fields we may not know."""
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    envelope = SignedEnvelope(
        payload=base64.b64encode(payload).decode(),
        signature=base64.b64encode(key.sign(payload)).decode(),
        key_id=key_id(key.public_key()),
    )
    return envelope.model_dump_json().encode()


def test_a_document_with_fields_this_reader_does_not_know_verifies_and_reads() -> None:
    """A newer cloud signs fields an older agent lacks: the agent still accepts the document,
    and the unknown fields are covered by the signature all the same."""
    key = generate_key()
    body = desired(rev=4).model_dump(mode="json") | {"rollout_policy": {"window": "night"}}
    body["added_later"] = True
    raw = _signed_raw(body, key)

    state = verify_desired_state(raw, key.public_key(), device_id="cam-1")
    assert state.rev == 4

    envelope = json.loads(raw)
    tampered_body = json.loads(base64.b64decode(envelope["payload"]))
    tampered_body["rollout_policy"]["window"] = "noon"
    envelope["payload"] = base64.b64encode(
        json.dumps(tampered_body, sort_keys=True, separators=(",", ":")).encode()
    ).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        verify_desired_state(json.dumps(envelope), key.public_key(), device_id="cam-1")


def test_a_document_of_a_newer_major_schema_is_refused_with_the_reason() -> None:
    key = generate_key()
    body = desired().model_dump(mode="json") | {"schema_version": 2}
    with pytest.raises(UnsupportedSchema, match="schema_version 2 is newer"):
        verify_desired_state(_signed_raw(body, key), key.public_key(), device_id="cam-1")


def test_an_envelope_with_an_extra_field_is_read() -> None:
    key = generate_key()
    envelope = json.loads(sign(desired(), key).model_dump_json()) | {"alg": "Ed25519"}
    state = verify_desired_state(json.dumps(envelope), key.public_key(), device_id="cam-1")
    assert state.rev == 3
