"""Artifact download over HTTP with Range support, and the chunk index."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from cloud.api.deps import ContextDep, DeviceOrAdmin, SessionDep
from cloud.registry import repository
from shared.errors import NotFound
from shared.topics import validate_sha256

__all__ = ["router"]

router = APIRouter(prefix="/v1/artifacts", tags=["artifacts"])


@router.get("/{sha256}", response_class=FileResponse)
def download(
    sha256: str, session: SessionDep, context: ContextDep, _who: DeviceOrAdmin
) -> FileResponse:
    """The artifact's bytes; `Range: bytes=a-b` answers 206 with that part (resumable)."""
    artifact = repository.get_artifact(session, sha256=validate_sha256(sha256))
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
    sha256: str, session: SessionDep, _who: DeviceOrAdmin
) -> dict[str, int | str | list[str]]:
    artifact = repository.get_artifact(session, sha256=validate_sha256(sha256))
    return {
        "sha256": artifact.sha256,
        "size": artifact.size,
        "chunk_size": artifact.chunk_size,
        "chunks": list(artifact.chunk_hashes),
    }
