"""The device's SuperNode key (SuperNode authentication): an EC P-384 key pair in OpenSSH
format, made once, private key 0600 from creation. Its public half is what an operator
registers with the SuperLink (`edgefleet federated register-node node_key.pub`)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.fsutil import atomic_write

__all__ = ["ensure_node_key"]


def ensure_node_key(path: Path) -> Path:
    """The private key at ``path`` (made if absent); returns the public key's path."""
    public = path.with_name(path.name + ".pub")
    if path.is_file() and public.is_file():
        return public
    path.parent.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public_bytes = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write(path, private_bytes, mode=0o600)
    atomic_write(public, public_bytes + b"\n", mode=0o644)
    return public
