"""Federated runs over REST: start one, list them, one with its rounds and the versions it
made, and cancel. The coordinator (``cloud.federated.coordinator``) does the rest."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, status
from pydantic import Field

from cloud.api.bounds import INT32_MAX
from cloud.api.deps import AdminAuth, ContextDep, SessionDep
from cloud.api.schemas import Name
from cloud.federated.coordinator import Coordinator
from cloud.federated.schemas import RunCreate, RunDetail, RunPublic, RunState
from cloud.federated.settings import FederatedSettings
from cloud.federated.store import create_run, detail, get_run, list_runs, public
from shared.errors import Conflict

__all__ = ["router"]

router = APIRouter(prefix="/v1/federated/runs", tags=["federated"])

RunId = Annotated[int, Field(ge=1, le=INT32_MAX)]


def _coordinator(request: Request) -> Coordinator | None:
    coordinator: Coordinator | None = getattr(request.app.state, "federated", None)
    return coordinator


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunDetail)
def start(
    body: RunCreate, session: SessionDep, context: ContextDep, actor: AdminAuth, request: Request
) -> RunDetail:
    """A PENDING run: the coordinator submits it to the SuperLink within a second."""
    coordinator = _coordinator(request)
    defaults = coordinator.settings if coordinator is not None else FederatedSettings()
    run = create_run(session, context.artifacts, request=body, defaults=defaults, actor=actor)
    shown = detail(session, run)
    session.commit()
    if coordinator is not None:
        coordinator.wake()
    return shown


@router.get("", response_model=list[RunPublic])
def list_federated_runs(
    session: SessionDep,
    _admin: AdminAuth,
    model: Name | None = None,
    state: RunState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=INT32_MAX)] = 0,
) -> list[RunPublic]:
    runs = list_runs(session, model=model, state=state, limit=limit, offset=offset)
    return [public(session, r) for r in runs]


@router.get("/{run_id}", response_model=RunDetail)
def get_federated_run(run_id: RunId, session: SessionDep, _admin: AdminAuth) -> RunDetail:
    """The run, its per-round metrics (clients, examples, loss, bytes, wall time) and the
    versions it registered."""
    return detail(session, get_run(session, run_id))


@router.post("/{run_id}/cancel", response_model=RunDetail)
def cancel_federated_run(
    run_id: RunId, session: SessionDep, context: ContextDep, _admin: AdminAuth, request: Request
) -> RunDetail:
    """Stop a pending or running run (its Flower run too); 409 once it is past that."""
    run = get_run(session, run_id)
    # A replica that does not coordinate (not started here) can still cancel: SQL and
    # `flwr stop` are all it takes.
    coordinator = _coordinator(request) or Coordinator(context, FederatedSettings())
    if not coordinator.cancel(run_id):
        raise Conflict(
            f"federated run {run_id} is {run.state}: only a pending or running run stops"
        )
    session.expire_all()
    return detail(session, get_run(session, run_id))
