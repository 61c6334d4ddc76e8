"""Where `edgefleet simulate` keeps its devices' folders: in memory (/dev/shm) where it has
room for them, else on disk; room checked up front; what a run wrote, removed after it."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from shared.errors import InvalidInput

__all__ = ["MIB_PER_AGENT", "check_room", "clean", "default_data_dir", "free_mib", "needed_mib"]

# Every device holds its token and config, and an active and a previous model (a partial
# one while it downloads): two versions of bench B4's 2 MB model. A bigger model needs more.
MIB_PER_AGENT = 4
_BASE_MIB = 16  # the workers' plans, status files and logs
_WRITTEN = ("devices", "workers")  # what cloud/simulate/fleet.py writes under its root


def needed_mib(agents: int) -> int:
    return _BASE_MIB + agents * MIB_PER_AGENT


def free_mib(path: Path) -> int:
    """Free space where ``path`` is, or would be made (its nearest existing parent)."""
    where = path.absolute()
    while not where.exists():
        where = where.parent
    return shutil.disk_usage(where).free // 2**20


def default_data_dir(prefix: str, agents: int, say: Callable[[str], None]) -> Path:
    """In memory where the machine has a tmpfs with room for ``agents`` devices: a thousand
    devices' downloads are then no thousand disks' fsyncs on one disk (the agent still makes
    each call). Else on disk, and ``say`` why (Docker gives a container 64 MiB of /dev/shm).
    The folder in memory is ours alone (0700, checked): the devices' tokens are in it."""
    shm = Path("/dev/shm")  # noqa: S108 - a private folder of ours is made and checked below
    disk = Path(".edgefleet") / "sim" / prefix
    if not shm.is_dir():
        return disk
    free, need = free_mib(shm), needed_mib(agents)
    if free < need:
        say(
            f"{shm} has {free} MiB free and {agents} devices need about {need} MiB: their "
            f"folders go to {disk} on disk"
        )
        return disk
    mine = shm / f"edgefleet-{os.getuid()}"
    mine.mkdir(mode=0o700, exist_ok=True)
    info = mine.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise InvalidInput(f"{mine} is not a private folder of ours: give --data-dir")
    return mine / f"sim-{prefix}"


def check_room(root: Path, agents: int) -> None:
    """Refuse a run whose devices would fill ``root``'s disk (or memory) before it starts."""
    free, need = free_mib(root), needed_mib(agents)
    if free < need:
        raise InvalidInput(
            f"{root} has {free} MiB free; {agents} simulated devices need about {need} MiB "
            f"({MIB_PER_AGENT} MiB each, for two versions of a 2 MB model): give --data-dir "
            "on a larger disk, or fewer --agents"
        )


def clean(root: Path) -> None:
    """Remove what a simulated fleet wrote under ``root`` (its devices' folders, tokens and
    models included, and its workers' files); anything else there stays."""
    for name in _WRITTEN:
        if (root / name).exists():
            shutil.rmtree(root / name)
