"""Crash-safe writes: a secret is private from the moment its file exists, a failed write
leaves the old file and no temporary one, and the default mode is what it always was."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.fsutil import atomic_write


@pytest.fixture
def umask_zero() -> Iterator[None]:
    """The most permissive umask: what the file gets is what the code asked for."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@pytest.mark.usefixtures("umask_zero")
def test_a_private_file_is_0600_before_it_is_renamed_into_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The temporary file already has mode 0600 when it takes the file's name: there is
    no moment when another user could open it (a chmod after the write comes too late)."""
    target = tmp_path / "agent.json"
    target.write_text("old")
    target.chmod(0o644)
    seen: list[int] = []
    replace = os.replace

    def watching_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        seen.append(_mode(Path(src)))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watching_replace)
    atomic_write(target, b'{"token": "efd_secret"}', mode=0o600)
    assert seen == [0o600]
    assert _mode(target) == 0o600
    assert target.read_bytes() == b'{"token": "efd_secret"}'


def test_by_default_the_mode_follows_the_umask_as_before(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "state.json", b"{}")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "state.json") == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails before the rename (a full disk, say) changes nothing: the old
    bytes stay and no temporary file is left for the next write to trip over."""
    target = tmp_path / "state.json"
    target.write_bytes(b"old")

    def full_disk(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
