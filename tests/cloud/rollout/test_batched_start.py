"""A wave's devices sent their version several to a transaction (on SQLite and PostgreSQL):
each still gets its own new rev with its target row, a stale engine writes nothing, and a
device that cannot be moved holds back only itself."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from cloud.artifacts.store import ArtifactStore
from cloud.context import CloudContext
from cloud.fleet.desired import stored_state
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.database import Database
from cloud.registry.tables import Device, RolloutTarget
from cloud.rollout.engine import RolloutEngine
from cloud.rollout.store import Deposed, create_rollout, start_targets
from cloud.rollout.strategy import Strategy
from shared.signing import generate_key
from tests.onnx_models import tiny_classifier

KEY = generate_key()
DAY = timedelta(days=1)


def _rollout(database: Database, store: ArtifactStore, devices: int) -> int:
    data = tiny_classifier()
    with database.session() as s:
        repository.create_model(s, name="m", task="classification")
        row = register_version(
            s, store, model_name="m", blocks=[data], max_bytes=len(data), precision="fp32",
            actor="test",
        )  # fmt: skip
        for i in range(devices):
            repository.enroll_device(s, device_id=f"d{i}", labels={"site": "lab"})
    with database.session() as s:
        rollout = create_rollout(
            s, model="m", version=row.version, selector={"site": "lab"},
            strategy=Strategy(canary=devices),
        )  # fmt: skip
        return rollout.id


def _targets(database: Database, rollout_id: int) -> dict[str, tuple[str, int | None]]:
    with database.session() as s:
        rows = s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id))
        return {r.device_id: (r.state, r.rev) for r in rows}


def test_a_batch_sends_each_pending_device_its_own_rev(database: Database, tmp_path: Path) -> None:
    """Four devices, one of them already DEPLOYING: the other three are moved in one call,
    each with a new rev in its signed document and on its target row."""
    rollout_id = _rollout(database, ArtifactStore(tmp_path / "a", chunk_size=1024), 4)
    with database.session() as s:
        assert start_targets(
            s, rollout_id=rollout_id, token=1, device_ids=["d2"], key=KEY, lifetime=DAY
        ) == ["d2"]
    with database.session() as s:
        moved = start_targets(
            s, rollout_id=rollout_id, token=1, device_ids=["d3", "d2", "d1", "d0"], key=KEY,
            lifetime=DAY,
        )  # fmt: skip
    assert moved == ["d0", "d1", "d3"]
    targets = _targets(database, rollout_id)
    assert {d: state for d, (state, _rev) in targets.items()} == dict.fromkeys(
        ["d0", "d1", "d2", "d3"], "DEPLOYING"
    )
    with database.session() as s:
        for device_id, (_state, rev) in targets.items():
            device = s.get(Device, device_id)
            assert device is not None
            state = stored_state(device)
            assert state is not None
            assert state.rev == rev == device.desired_rev == 1
            assert [d.rollout_id for d in state.deployments] == [rollout_id]


def test_a_deposed_engine_moves_nobody(database: Database, tmp_path: Path) -> None:
    rollout_id = _rollout(database, ArtifactStore(tmp_path / "a", chunk_size=1024), 2)
    with database.session() as s:
        start_targets(s, rollout_id=rollout_id, token=5, device_ids=["d0"], key=KEY, lifetime=DAY)
    with pytest.raises(Deposed), database.session() as s:
        start_targets(s, rollout_id=rollout_id, token=4, device_ids=["d1"], key=KEY, lifetime=DAY)
    assert _targets(database, rollout_id)["d1"] == ("PENDING", None)


def test_a_device_that_cannot_be_moved_holds_back_only_itself(context: CloudContext) -> None:
    """One device's desired state names a version that no longer exists (its document
    cannot be built): its batch fails, is taken one device at a time, and the other devices
    are sent the version and published; that one stays PENDING for the next round."""
    rollout_id = _rollout(context.database, context.artifacts, 5)
    with context.database.session() as s:
        broken = s.get(Device, "d3")
        assert broken is not None
        broken.desired = {"gone": {"version_id": 999_999, "rollout_id": None}}
    published: list[str] = []
    engine = RolloutEngine(context, lambda device_id: published.append(device_id) or True)
    try:
        assert engine.tick()
    finally:
        engine.leadership.release()
    assert sorted(published) == ["d0", "d1", "d2", "d4"]
    targets = _targets(context.database, rollout_id)
    assert targets["d3"] == ("PENDING", None)
    assert {targets[d][0] for d in ("d0", "d1", "d2", "d4")} == {"DEPLOYING"}
