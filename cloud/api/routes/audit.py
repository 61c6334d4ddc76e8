"""The audit log: who changed what, newest first."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import AdminAuth, SessionDep
from cloud.api.schemas import AuditPublic
from cloud.registry import repository

__all__ = ["router"]

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=list[AuditPublic])
def list_audit(
    session: SessionDep,
    _actor: AdminAuth,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[AuditPublic]:
    return [AuditPublic.model_validate(e) for e in repository.list_audit(session, limit=limit)]
