"""Artifact download over HTTP with Range support, and the chunk index.

A device sees only the artifacts of its own desired state (what it was told to run); the
admin sees every one. A cloud-only model is never a device's to download."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from cloud.api.deps import ContextDep, DeviceOrAdmin, SessionDep
from cloud.fleet.desired import desired_artifacts
from cloud.registry import repository
from cloud.registry.tables import Artifact
from shared.errors import Forbidden, NotFound
from shared.topics import validate_sha256

__all__ = ["router"]

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


def _visible(session: Session, sha256: str, caller: DeviceOrAdmin) -> Artifact:
    artifact = repository.get_artifact(session, sha256=validate_sha256(sha256))
    if caller is not None and artifact.sha256 not in desired_artifacts(session, device=caller):
        raise Forbidden(f"artifact {sha256} is not in device {caller.id!r}'s desired state")
    return artifact


@router.get("/{sha256}", response_class=FileResponse)
def download(
    sha256: str, session: SessionDep, context: ContextDep, caller: DeviceOrAdmin
) -> FileResponse:
    """The artifact's bytes; `Range: bytes=a-b` answers 206 with that part (resumable)."""
    artifact = _visible(session, sha256, caller)
    path = context.artifacts.path(artifact.sha256)
    if not path.is_file():
        raise NotFound(f"artifact {sha256} is registered but its file is missing")
    return FileResponse(
        path,
        media_type="application/octet-stream",
        headers={"ETag": f'"{artifact.sha256}"', "Cache-Control": "immutable"},
    )


@router.get("/{sha256}/chunks")
def chunk_index(
    sha256: str, session: SessionDep, caller: DeviceOrAdmin
) -> dict[str, int | str | list[str]]:
    artifact = _visible(session, sha256, caller)
    return {
        "sha256": artifact.sha256,
        "size": artifact.size,
        "chunk_size": artifact.chunk_size,
        "chunks": list(artifact.chunk_hashes),
    }
