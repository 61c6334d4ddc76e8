"""Pipeline operations over REST: quantize a version, register the reference models."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cloud.api.bounds import VersionNumber
from cloud.api.deps import AdminAuth, ContextDep
from cloud.api.forms import parse_json_field
from cloud.api.routes.models import version_public
from cloud.api.schemas import VersionPublic
from cloud.context import CloudContext
from cloud.pipeline.calibrate import RoutingTarget
from cloud.pipeline.datasets import from_npz
from cloud.pipeline.quantize import QuantMethod
from cloud.pipeline.reference.build import REFERENCE_MODELS, register_reference
from cloud.pipeline.service import QuantizeOptions, quantize_version
from cloud.registry import repository
from shared.errors import InvalidInput
from shared.messages import RoutingPolicy, TensorSpec

__all__ = ["router"]

router = APIRouter(tags=["pipeline"])
MAX_DATASET_BYTES = 256 * 1024 * 1024


class QuantizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_drop_pt: float = Field(default=0.5, ge=0, le=100)
    min_cosine: float = Field(default=0.99, ge=0, le=1)
    target: str | None = Field(
        default=None,
        pattern=r"^(budget|gap):[0-9.]+$",
        description="budget:<share> or gap:<share>; "
        "default gap:0.8 with a cloud_model, else budget:0.2",
    )
    policy: RoutingPolicy | None = None
    cloud_model: str | None = Field(
        default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:[0-9]+$"
    )
    method: QuantMethod | None = None
    allow_larger: bool = Field(
        default=False,
        description="register an INT8 child even if it is larger than its FP32 parent "
        "(the warning is kept in its metrics and the audit log)",
    )

    def options(self) -> QuantizeOptions:
        cloud = None
        if self.cloud_model:
            name, _, version = self.cloud_model.rpartition(":")
            cloud = (name, int(version))
        default = "gap:0.8" if cloud else "budget:0.2"
        target = RoutingTarget.parse(self.target or default)
        return QuantizeOptions(
            max_drop_pt=self.max_drop_pt,
            min_cosine=self.min_cosine,
            target=target,
            policy=self.policy,
            cloud_model=cloud,
            method=self.method,
            allow_larger=self.allow_larger,
        )


def _public(context: CloudContext, model: str, version: int) -> VersionPublic:
    with context.database.session() as s:
        return version_public(repository.get_version(s, model_name=model, version=version))


@router.post(
    "/v1/models/{name}/versions/{version}/quantize",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionPublic,
    responses={
        422: {
            "description": "the INT8 candidate failed the accuracy gate, or is larger than "
            "its FP32 parent without allow_larger"
        }
    },
)
async def quantize(
    name: str,
    version: VersionNumber,
    context: ContextDep,
    actor: AdminAuth,
    options: Annotated[str | None, Form(description="JSON: QuantizeRequest")] = None,
    dataset: Annotated[UploadFile | None, File(description=".npz: inputs and labels y")] = None,
) -> VersionPublic:
    """Quantize an FP32 version to INT8, gate it against its parent, calibrate routing,
    and register it as a new version. Without a dataset the version's recorded one is used."""
    request = parse_json_field(options, QuantizeRequest, field="options")
    raw = await dataset.read(MAX_DATASET_BYTES + 1) if dataset is not None else None
    if raw is not None and len(raw) > MAX_DATASET_BYTES:
        raise InvalidInput(f"dataset over {MAX_DATASET_BYTES} bytes")

    def work() -> VersionPublic:
        data = None
        if raw is not None:
            with context.database.session() as s:
                row = repository.get_version(s, model_name=name, version=version)
                specs = [TensorSpec.model_validate(i) for i in row.inputs]
            data = from_npz(raw, specs)
        new = quantize_version(
            context, model=name, version=version, data=data, options=request.options(), actor=actor
        )
        return _public(context, name, new)

    return await run_in_threadpool(work)


ReferenceName = Literal["digits-cloud", "digits-edge", "digits-edge-weak", "minilm"]
DEFAULT_REFERENCE: tuple[ReferenceName, ...] = ("digits-cloud", "digits-edge", "digits-edge-weak")


class ReferenceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ReferenceName] = Field(
        default_factory=lambda: list(DEFAULT_REFERENCE), min_length=1
    )


@router.post("/v1/reference-models", status_code=status.HTTP_201_CREATED)
async def build_reference(
    body: ReferenceRequest, context: ContextDep, actor: AdminAuth
) -> list[VersionPublic]:
    """Build the named reference models (cached) and register FP32 and INT8 versions.
    Models that already have versions are left alone; the answer lists what was added."""
    done = await run_in_threadpool(
        register_reference, context, names=list(body.models), actor=actor
    )
    return [_public(context, model, version) for model, version in done]


@router.get("/v1/reference-models")
def list_reference(_actor: AdminAuth) -> dict[str, dict[str, str]]:
    return {n: {"description": m.description, "task": m.task} for n, m in REFERENCE_MODELS.items()}
