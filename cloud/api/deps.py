"""Annotated dependencies: the context, a DB session per request, admin and device auth."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from cloud.context import CloudContext
from cloud.registry import repository
from cloud.registry.tables import Device
from shared.errors import Unauthorized

__all__ = [
    "AdminAuth",
    "ContextDep",
    "DeviceAuth",
    "DeviceOrAdmin",
    "SessionDep",
]


def get_context(request: Request) -> CloudContext:
    context: CloudContext = request.app.state.context
    return context


ContextDep = Annotated[CloudContext, Depends(get_context)]


def get_session(context: ContextDep) -> Iterator[Session]:
    with context.database.session() as session:
        yield session


# "function" scope: the unit of work commits before the response leaves, so a client
# that reads right after a write sees it, and a failed commit is the request's error.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


def require_admin(request: Request, context: ContextDep) -> str:
    token = _bearer(request)
    if not secrets.compare_digest(token.encode(), context.settings.admin_token.encode()):
        raise Unauthorized("invalid admin token")
    return "admin"


AdminAuth = Annotated[str, Depends(require_admin)]


def require_device(request: Request, session: SessionDep) -> Device:
    return repository.authenticate_device(session, token=_bearer(request))


DeviceAuth = Annotated[Device, Depends(require_device)]


def require_device_or_admin(
    request: Request, context: ContextDep, session: SessionDep
) -> Device | None:
    """The calling device, or None for the admin."""
    token = _bearer(request)
    if secrets.compare_digest(token.encode(), context.settings.admin_token.encode()):
        return None
    return repository.authenticate_device(session, token=token)


# A device, or None when the admin calls: routes scope what a device may see.
DeviceOrAdmin = Annotated[Device | None, Depends(require_device_or_admin)]
