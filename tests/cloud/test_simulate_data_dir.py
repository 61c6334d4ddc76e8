"""`edgefleet simulate`'s data dir: in memory only where /dev/shm has room for the devices,
and a run refused up front, with the numbers, where the disk has none."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.simulate.data_dir import MIB_PER_AGENT, check_room, default_data_dir, free_mib
from shared.errors import InvalidInput


def test_a_fleet_too_big_for_dev_shm_goes_to_disk_and_says_so() -> None:
    """More devices than /dev/shm has room for (about 4 MiB each): their folders go to disk,
    and the command says why."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("this machine has no /dev/shm")
    said: list[str] = []
    agents = free_mib(shm) // MIB_PER_AGENT + 1000
    root = default_data_dir("big", agents, say=said.append)
    assert root == Path(".edgefleet") / "sim" / "big"
    assert len(said) == 1
    assert "MiB free" in said[0]
    assert str(root) in said[0]


def test_a_disk_without_room_for_the_fleet_is_refused_with_the_numbers(tmp_path: Path) -> None:
    agents = free_mib(tmp_path) // MIB_PER_AGENT + 1000
    with pytest.raises(InvalidInput, match=r"MiB free; .* simulated devices need about"):
        check_room(tmp_path / "not-made-yet", agents)
    check_room(tmp_path / "not-made-yet", 2)
    assert not (tmp_path / "not-made-yet").exists()
