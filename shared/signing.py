"""Ed25519 signing of protocol documents (desired state, manifests).

A signed document travels as an envelope ``{"payload": b64, "signature": b64, "key_id"}``:
the payload is the canonical JSON of the message, so the bytes that were signed are the
bytes that are verified, whatever JSON library sits in between.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict

from shared.errors import ExpiredDocument, ProtocolError, SignatureError
from shared.messages import DesiredState, Message, decode

__all__ = [
    "SignedEnvelope",
    "canonical_json",
    "generate_key",
    "key_id",
    "load_or_create_private_key",
    "load_public_key",
    "public_key_b64",
    "sign",
    "verify",
    "verify_desired_state",
]

M = TypeVar("M", bound=Message)
CLOCK_SKEW = timedelta(minutes=5)


class SignedEnvelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    payload: str
    signature: str
    key_id: str


def canonical_json(message: BaseModel) -> bytes:
    return json.dumps(
        message.model_dump(mode="json"), sort_keys=True, separators=(",", ":")
    ).encode()


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def load_or_create_private_key(path: Path) -> Ed25519PrivateKey:
    """The cloud's signing key: created on first start (mode 0600), then reused."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{path} is not an Ed25519 private key")
        return key
    key = generate_key()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(pem)
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


def _raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(public_key: Ed25519PublicKey) -> str:
    return base64.b64encode(_raw_public(public_key)).decode()


def load_public_key(b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("invalid Ed25519 public key") from exc


def key_id(public_key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


def sign(message: Message, private_key: Ed25519PrivateKey) -> SignedEnvelope:
    payload = canonical_json(message)
    return SignedEnvelope(
        payload=base64.b64encode(payload).decode(),
        signature=base64.b64encode(private_key.sign(payload)).decode(),
        key_id=key_id(private_key.public_key()),
    )


def verify(envelope: SignedEnvelope | bytes | str, public_key: Ed25519PublicKey, cls: type[M]) -> M:
    """Check the signature against the pinned key, then parse the payload as ``cls``."""
    if not isinstance(envelope, SignedEnvelope):
        try:
            # Tolerant like every reader: an envelope may grow fields (say, an algorithm).
            envelope = SignedEnvelope.model_validate_json(envelope, extra="ignore")
        except ValueError as exc:
            raise ProtocolError("malformed signed envelope") from exc
    try:
        payload = base64.b64decode(envelope.payload, validate=True)
        signature = base64.b64decode(envelope.signature, validate=True)
    except binascii.Error as exc:
        raise SignatureError("envelope is not valid base64") from exc
    if envelope.key_id != key_id(public_key):
        raise SignatureError(f"signed by unknown key {envelope.key_id!r}")
    try:
        public_key.verify(signature, payload)
    except InvalidSignature as exc:
        raise SignatureError("signature does not verify") from exc
    return decode(cls, payload)


def verify_desired_state(
    envelope: SignedEnvelope | bytes | str,
    public_key: Ed25519PublicKey,
    *,
    device_id: str,
    now: datetime | None = None,
) -> DesiredState:
    """Verify a desired-state document for ``device_id``: signature, addressee, freshness."""
    state = verify(envelope, public_key, DesiredState)
    now = now or datetime.now(UTC)
    if state.device_id != device_id:
        raise SignatureError(f"document is for device {state.device_id!r}, not {device_id!r}")
    if state.expires_at <= now:
        raise ExpiredDocument(f"document rev {state.rev} expired at {state.expires_at}")
    if state.issued_at > now + CLOCK_SKEW:
        raise SignatureError(f"document rev {state.rev} is issued in the future")
    return state
