"""Crash-safe file writes: write a temporary file, fsync it, rename it, fsync the folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir"]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o666) -> None:
    """After a crash ``path`` holds either the old bytes or the new ones, never a mix.

    The file is created with ``mode`` (less the umask) and never has any other: with 0o600,
    a secret is private from the moment it exists, not after a chmod that comes too late.
    """
    # A name of its own per write: O_EXCL refuses a leftover of a crashed writer.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
