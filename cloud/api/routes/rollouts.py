"""Rollouts over REST: start one (a version, or an undeploy), list them, its progress by
wave, its devices (paginated), and the operator's pause / resume / abort. The engine (fleet
role) does the rest."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.api.bounds import INT32_MAX, VersionNumber
from cloud.api.deps import AdminAuth, SessionDep
from cloud.api.schemas import Label, Name
from cloud.registry.tables import Model, ModelVersion, Rollout, RolloutTarget
from cloud.rollout.store import command, create_rollout
from cloud.rollout.strategy import RolloutState, Strategy, TargetState, stored_strategy
from shared.errors import NotFound

__all__ = ["router"]

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

RolloutId = Annotated[int, Field(ge=1, le=INT32_MAX)]


class RolloutCreate(BaseModel):
    """A version to roll out, or ``undeploy: true`` (and no version) to take the model off
    the matching devices that run it, in the same waves."""

    model_config = ConfigDict(extra="forbid")

    model: Name
    version: VersionNumber | None = None
    undeploy: bool = False
    selector: dict[Label, Label] = Field(default_factory=dict, max_length=32)
    strategy: Strategy = Field(default_factory=Strategy)

    @model_validator(mode="after")
    def _version_or_undeploy(self) -> RolloutCreate:
        if self.undeploy and self.version is not None:
            raise ValueError("an undeploy takes no version")
        if not self.undeploy and self.version is None:
            raise ValueError("give the version to roll out (or undeploy: true)")
        return self


class WaveProgress(BaseModel):
    wave: int
    devices: int
    states: dict[str, int]


class RolloutPublic(BaseModel):
    id: int
    model: str
    version: int | None = Field(description="None for an undeploy")
    undeploy: bool
    selector: dict[str, str]
    strategy: Strategy
    state: RolloutState
    reason: str | None
    current_wave: int
    waves: int
    devices: int
    states: dict[str, int] = Field(description="devices by target state")
    superseded_by: int | None
    created_by: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


class RolloutDetail(RolloutPublic):
    progress: list[WaveProgress]


class TargetPublic(BaseModel):
    device_id: str
    wave: int
    state: TargetState
    rev: int | None
    started_at: datetime | None
    reason: str | None
    updated_at: datetime


class TargetPage(BaseModel):
    total: int
    items: list[TargetPublic]


def _counts(session: Session, rollout_ids: list[int]) -> dict[int, dict[tuple[int, str], int]]:
    """Targets per (wave, state) of each rollout, counted in the database."""
    counts: dict[int, dict[tuple[int, str], int]] = {i: {} for i in rollout_ids}
    rows = session.execute(
        select(RolloutTarget.rollout_id, RolloutTarget.wave, RolloutTarget.state, func.count())
        .where(RolloutTarget.rollout_id.in_(rollout_ids))
        .group_by(RolloutTarget.rollout_id, RolloutTarget.wave, RolloutTarget.state)
    ).all()
    for rollout_id, wave, state, count in rows:
        counts[rollout_id][(wave, state)] = count
    return counts


def _names(session: Session, rollouts: list[Rollout]) -> tuple[dict[int, str], dict[int, int]]:
    """Model names and version numbers of ``rollouts``, in two queries for any number."""
    model_ids = {r.model_id for r in rollouts if r.model_id is not None}
    version_ids = {r.model_version_id for r in rollouts if r.model_version_id is not None}
    models: dict[int, str] = {}
    versions: dict[int, int] = {}
    if model_ids:
        named = select(Model.id, Model.name).where(Model.id.in_(model_ids))
        models.update((i, n) for i, n in session.execute(named).all())
    if version_ids:
        numbered = select(ModelVersion.id, ModelVersion.version)
        numbered = numbered.where(ModelVersion.id.in_(version_ids))
        versions.update((i, v) for i, v in session.execute(numbered).all())
    return models, versions


def _public(
    session: Session,
    rollout: Rollout,
    counts: dict[tuple[int, str], int],
    names: tuple[dict[int, str], dict[int, int]] | None = None,
) -> RolloutPublic:
    models, versions = names or _names(session, [rollout])
    model = models.get(rollout.model_id) if rollout.model_id is not None else None
    version = (
        versions.get(rollout.model_version_id) if rollout.model_version_id is not None else None
    )
    states: dict[str, int] = {}
    for (_wave, state), count in counts.items():
        states[state] = states.get(state, 0) + count
    return RolloutPublic(
        id=rollout.id, model=model or "?", version=version,
        undeploy=rollout.model_version_id is None,
        selector=rollout.selector, strategy=stored_strategy(rollout.strategy)[0],
        state=RolloutState(rollout.state), reason=rollout.reason,
        current_wave=rollout.current_wave,
        waves=max((wave for wave, _s in counts), default=-1) + 1,
        devices=sum(counts.values()), states=states, superseded_by=rollout.superseded_by,
        created_by=rollout.created_by, created_at=rollout.created_at,
        updated_at=rollout.updated_at, finished_at=rollout.finished_at,
    )  # fmt: skip


def _detail(session: Session, rollout: Rollout) -> RolloutDetail:
    counts = _counts(session, [rollout.id])[rollout.id]
    waves: dict[int, dict[str, int]] = {}
    for (wave, state), count in sorted(counts.items()):
        waves.setdefault(wave, {})[state] = count
    progress = [
        WaveProgress(wave=w, devices=sum(s.values()), states=s) for w, s in sorted(waves.items())
    ]
    return RolloutDetail(**_public(session, rollout, counts).model_dump(), progress=progress)


def _get(session: Session, rollout_id: int) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise NotFound(f"unknown rollout {rollout_id}")
    return rollout


def _wake_engine(request: Request) -> None:
    fleet = getattr(request.app.state, "fleet", None)
    engine = getattr(fleet, "rollouts", None)
    if engine is not None:
        engine.wake()


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RolloutDetail)
def start(
    body: RolloutCreate, session: SessionDep, actor: AdminAuth, request: Request
) -> RolloutDetail:
    """Plan the waves and start; an active rollout of the same model is superseded. With
    ``undeploy``, each device's new desired state leaves the model out, and a device counts
    as done once its agent confirms the model is unloaded (REMOVED)."""
    rollout = create_rollout(
        session, model=body.model, version=body.version, selector=body.selector,
        strategy=body.strategy, actor=actor,
    )  # fmt: skip
    detail = _detail(session, rollout)
    session.commit()
    _wake_engine(request)
    return detail


@router.get("", response_model=list[RolloutPublic])
def list_rollouts(
    session: SessionDep,
    _admin: AdminAuth,
    state: RolloutState | None = None,
    model: Name | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> list[RolloutPublic]:
    query = select(Rollout).order_by(Rollout.id.desc()).limit(limit).offset(offset)
    if state is not None:
        query = query.where(Rollout.state == state.value)
    if model is not None:
        query = query.join(Model, Model.id == Rollout.model_id).where(Model.name == model)
    rollouts = list(session.scalars(query).all())
    counts = _counts(session, [r.id for r in rollouts])
    names = _names(session, rollouts)
    return [_public(session, r, counts[r.id], names) for r in rollouts]


@router.get("/{rollout_id}", response_model=RolloutDetail)
def get_rollout(rollout_id: RolloutId, session: SessionDep, _admin: AdminAuth) -> RolloutDetail:
    return _detail(session, _get(session, rollout_id))


@router.get("/{rollout_id}/targets", response_model=TargetPage)
def list_targets(
    rollout_id: RolloutId,
    session: SessionDep,
    _admin: AdminAuth,
    state: TargetState | None = None,
    wave: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> TargetPage:
    _get(session, rollout_id)
    where = [RolloutTarget.rollout_id == rollout_id]
    if state is not None:
        where.append(RolloutTarget.state == state.value)
    if wave is not None:
        where.append(RolloutTarget.wave == wave)
    total = session.scalar(select(func.count()).select_from(RolloutTarget).where(*where)) or 0
    rows = session.scalars(
        select(RolloutTarget)
        .where(*where)
        .order_by(RolloutTarget.wave, RolloutTarget.device_id)
        .limit(limit)
        .offset(offset)
    ).all()
    items = [
        TargetPublic(
            device_id=r.device_id,
            wave=r.wave,
            state=TargetState(r.state),
            rev=r.rev,
            started_at=r.started_at,
            reason=r.reason,
            updated_at=r.updated_at,
        )
        for r in rows
    ]
    return TargetPage(total=total, items=items)


@router.post("/{rollout_id}/{action}", response_model=RolloutDetail)
def command_rollout(
    rollout_id: RolloutId,
    action: Literal["pause", "resume", "abort"],
    session: SessionDep,
    actor: AdminAuth,
    request: Request,
) -> RolloutDetail:
    """pause (no new devices), resume, abort (every device that took the version goes
    back to its previous one); 409 from a state the command does not apply to."""
    rollout = command(session, rollout_id=rollout_id, action=action, actor=actor)
    detail = _detail(session, rollout)
    session.commit()
    _wake_engine(request)
    return detail
