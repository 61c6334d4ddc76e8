"""Support for the rollout store and engine tests: devices, reports and deploys made by hand,
and an engine whose publishes are recorded instead of sent."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from cloud.context import CloudContext
from cloud.fleet.desired import issue, set_deployment, stored_state
from cloud.registry import repository
from cloud.registry.tables import DeploymentEvent, Device, Rollout, RolloutTarget
from cloud.rollout.engine import RolloutEngine
from cloud.rollout.leader import Leadership
from cloud.rollout.store import create_rollout
from cloud.rollout.strategy import Strategy

MODEL = "alpha"


def devices(context: CloudContext, count: int, prefix: str = "d") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(count)]
    with context.database.session() as s:
        for device_id in ids:
            repository.enroll_device(s, device_id=device_id, labels={"site": "x"})
    return ids


def engine(
    context: CloudContext, ttl_s: float = 10.0, publish: Callable[[str], bool] | None = None
) -> tuple[RolloutEngine, list[str]]:
    """An engine with a lease of its own and the devices it published, in order."""
    published: list[str] = []

    def record(device_id: str) -> bool:
        published.append(device_id)
        return True

    leadership = Leadership(context.redis, ttl_s=ttl_s)
    return RolloutEngine(context, publish or record, leadership=leadership), published


def start(context: CloudContext, version: int, **strategy: object) -> int:
    """A rollout of ``alpha:version`` to every device labelled site=x."""
    with context.database.session() as s:
        rollout = create_rollout(
            s, model=MODEL, version=version, selector={"site": "x"},
            strategy=Strategy.model_validate(strategy or {"canary": 1}),
        )  # fmt: skip
        return rollout.id


def report(
    context: CloudContext, rollout_id: int, device_id: str, state: str, version: int
) -> None:
    """The device's status on the rev its target waits on, as the ingest stores it."""
    with context.database.session() as s:
        target = s.scalar(
            select(RolloutTarget).where(
                RolloutTarget.rollout_id == rollout_id, RolloutTarget.device_id == device_id
            )
        )
        assert target is not None
        assert target.rev is not None
        s.add(
            DeploymentEvent(
                device_id=device_id, rev=target.rev, rollout_id=rollout_id, model=MODEL,
                version=version, state=state, at=datetime.now(UTC),
            )
        )  # fmt: skip


def deploy(context: CloudContext, device_id: str, version: int) -> None:
    """An operator's manual deploy (outside any rollout)."""
    with context.database.session() as s:
        device = repository.lock_device(s, device_id=device_id)
        row = repository.get_version(s, model_name=MODEL, version=version)
        set_deployment(device=device, version=row)
        issue(s, device=device, key=context.signing_key, lifetime=timedelta(days=1))


def targets(context: CloudContext, rollout_id: int) -> dict[str, str]:
    with context.database.session() as s:
        rows = s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id))
        return {t.device_id: t.state for t in rows}


def reasons(context: CloudContext, rollout_id: int) -> dict[str, str | None]:
    with context.database.session() as s:
        rows = s.scalars(select(RolloutTarget).where(RolloutTarget.rollout_id == rollout_id))
        return {t.device_id: t.reason for t in rows}


def rollout(context: CloudContext, rollout_id: int) -> tuple[str, str | None]:
    """The rollout's state and reason."""
    with context.database.session() as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        return row.state, row.reason


def set_state(context: CloudContext, rollout_id: int, state: str) -> None:
    with context.database.session() as s:
        row = s.get(Rollout, rollout_id)
        assert row is not None
        row.state = state


def desired_versions(context: CloudContext, device_id: str) -> list[int]:
    """The versions of the device's signed desired document."""
    with context.database.session() as s:
        device = s.get(Device, device_id)
        assert device is not None
        state = stored_state(device)
        return [] if state is None else [d.manifest.version for d in state.deployments]
