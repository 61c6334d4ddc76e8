"""The offload budget the inference replicas share (read from Redis), for the dashboard."""

from __future__ import annotations

from datetime import UTC, datetime

import redis
from fastapi import APIRouter
from pydantic import BaseModel, Field

from cloud.api.deps import AdminAuth, ContextDep
from cloud.inference.budget_store import BudgetStore
from shared.errors import ServiceUnavailable

__all__ = ["BudgetPublic", "BudgetView", "router"]

router = APIRouter(prefix="/v1/inference", tags=["inference"])


class BudgetPublic(BaseModel):
    max_offload: float = Field(description="share of their inputs devices may offload")
    reason: str
    until: datetime = Field(description="when devices stop following it unless renewed")
    since: datetime = Field(description="when this episode of saturation began")
    changed_at: datetime = Field(description="when the share last moved")


class BudgetView(BaseModel):
    enabled: bool
    queue_bound_ms: float
    budget: BudgetPublic | None = Field(description="null: no budget, devices route freely")
    saturated_replicas: list[str] = Field(description="inference replicas saturated now")


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@router.get(
    "/budget",
    response_model=BudgetView,
    responses={503: {"description": "Redis, which holds the budget, is not reachable"}},
)
def get_budget(context: ContextDep, _admin: AdminAuth) -> BudgetView:
    settings = context.settings
    store = BudgetStore(context.redis, replica="api", replica_ttl_s=0)
    try:
        now = store.now()  # the replicas' clock
        state, saturated = store.read(), store.saturated(now)
    except redis.RedisError as exc:
        raise ServiceUnavailable(f"the budget is kept in Redis, which failed: {exc}") from exc
    budget = None
    if state is not None and state.until > now:
        budget = BudgetPublic(
            max_offload=state.max_offload,
            reason=state.reason,
            until=_at(state.until),
            since=_at(state.since),
            changed_at=_at(state.changed_at),
        )
    return BudgetView(
        enabled=settings.inference_budget,
        queue_bound_ms=settings.inference_budget_queue_ms,
        budget=budget,
        saturated_replicas=saturated,
    )
