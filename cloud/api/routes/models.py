"""Models and their versions: create, upload, list, get."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from starlette.concurrency import run_in_threadpool

from cloud.api.bounds import VersionNumber
from cloud.api.deps import AdminAuth, ContextDep, SessionDep
from cloud.api.forms import parse_json_field
from cloud.api.schemas import ModelCreate, ModelPublic, VersionCreate, VersionPublic
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.tables import Model, ModelVersion
from shared.messages import RoutingSpec, TensorSpec

__all__ = ["router", "version_public"]

router = APIRouter(prefix="/v1/models", tags=["models"])


def version_public(row: ModelVersion) -> VersionPublic:
    parent = None
    if row.parent_id is not None:
        parent = next((v.version for v in row.model.versions if v.id == row.parent_id), None)
    return VersionPublic(
        model=row.model.name,
        version=row.version,
        parent_version=parent,
        precision=row.precision,
        sha256=row.artifact.sha256,
        size=row.artifact.size,
        chunk_size=row.artifact.chunk_size,
        inputs=[TensorSpec.model_validate(s) for s in row.inputs],
        outputs=[TensorSpec.model_validate(s) for s in row.outputs],
        metrics=row.metrics,
        calibration=row.calibration,
        routing=RoutingSpec.model_validate(row.routing) if row.routing else None,
        trainable=list(row.trainable),
        source=row.source,
        created_at=row.created_at,
    )


def _model_public(model: Model) -> ModelPublic:
    public = ModelPublic.model_validate(model)
    public.latest_version = model.versions[-1].version if model.versions else None
    return public


@router.post("", status_code=status.HTTP_201_CREATED, response_model=ModelPublic)
def create_model(body: ModelCreate, session: SessionDep, actor: AdminAuth) -> ModelPublic:
    model = repository.create_model(
        session, name=body.name, description=body.description, task=body.task
    )
    repository.record_audit(session, actor=actor, action="model.create", subject=body.name)
    return ModelPublic(
        name=model.name,
        description=model.description,
        task=model.task,
        created_at=model.created_at,
    )


@router.get("", response_model=list[ModelPublic])
def list_models(session: SessionDep, _actor: AdminAuth) -> list[ModelPublic]:
    return [_model_public(m) for m in repository.list_models(session)]


@router.get("/{name}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep, _actor: AdminAuth) -> ModelPublic:
    return _model_public(repository.get_model(session, name=name))


@router.get("/{name}/versions", response_model=list[VersionPublic])
def list_versions(name: str, session: SessionDep, _actor: AdminAuth) -> list[VersionPublic]:
    return [version_public(v) for v in repository.list_versions(session, model_name=name)]


@router.get("/{name}/versions/{version}", response_model=VersionPublic)
def get_version(
    name: str, version: VersionNumber, session: SessionDep, _actor: AdminAuth
) -> VersionPublic:
    return version_public(repository.get_version(session, model_name=name, version=version))


def _blocks(upload: UploadFile) -> Iterator[bytes]:
    upload.file.seek(0)
    while block := upload.file.read(1 << 20):
        yield block


@router.post("/{name}/versions", status_code=status.HTTP_201_CREATED, response_model=VersionPublic)
async def upload_version(
    name: str,
    file: Annotated[UploadFile, File(description="the ONNX model")],
    session: SessionDep,
    context: ContextDep,
    actor: AdminAuth,
    metadata: Annotated[str | None, Form(description="JSON: VersionCreate")] = None,
) -> VersionPublic:
    meta = parse_json_field(metadata, VersionCreate, field="metadata")

    def register() -> VersionPublic:
        row = register_version(
            session,
            context.artifacts,
            model_name=name,
            blocks=_blocks(file),
            max_bytes=context.settings.max_upload_bytes,
            precision=meta.precision,
            actor=actor,
            parent_version=meta.parent_version,
            metrics=meta.metrics,
            routing=meta.routing,
            trainable=meta.trainable,
            healthcheck=meta.healthcheck,
        )
        session.flush()
        session.refresh(row)
        return version_public(row)

    return await run_in_threadpool(register)
