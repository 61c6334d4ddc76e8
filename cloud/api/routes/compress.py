"""Compression over REST: distil a student from a teacher, prune a version, convert one to
FP16 (each child gated against its parent), and a model's compression report."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Path, Query, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from cloud.api.bounds import VersionNumber
from cloud.api.deps import AdminAuth, ContextDep
from cloud.api.forms import parse_json_field
from cloud.api.routes.models import version_public
from cloud.api.schemas import VersionPublic
from cloud.context import CloudContext
from cloud.pipeline.calibrate import RoutingTarget
from cloud.pipeline.compress.distill import DistillOptions, distill_version
from cloud.pipeline.compress.jobs import admitted
from cloud.pipeline.compress.mlp import StudentArch, TrainOptions
from cloud.pipeline.compress.prune import PruneMethod
from cloud.pipeline.compress.report import compression_report
from cloud.pipeline.compress.service import (
    Fp16Options,
    PruneOptions,
    fp16_version,
    prune_version,
)
from cloud.pipeline.service import QuantizeOptions
from cloud.registry import repository
from shared.errors import InvalidInput
from shared.messages import RoutingPolicy

__all__ = ["router"]

router = APIRouter(tags=["compression"])
MAX_DATASET_BYTES = 256 * 1024 * 1024
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_REF = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}:[0-9]{1,10}$"
_REFUSED: dict[int | str, dict[str, Any]] = {
    409: {"description": "another compression job is writing this model"},
    422: {"description": "the candidate failed the gate against its parent (the figures are in "
          "the error)"},
    503: {"description": "this API process runs as many compression jobs as it takes "
          "(Retry-After says when to try again)"},
}  # fmt: skip
ModelName = Annotated[str, Path(pattern=_NAME)]


def _ref(text: str) -> tuple[str, int]:
    name, _, version = text.rpartition(":")
    if not 1 <= int(version) <= 2**31 - 1:
        raise InvalidInput(f"{text!r}: a version is a number from 1")
    return name, int(version)


class GateRequest(BaseModel):
    """The gate's tolerance and, for edge classifiers, how routing is calibrated."""

    model_config = ConfigDict(extra="forbid")

    max_drop_pt: float = Field(default=0.5, ge=0, le=100)
    min_cosine: float = Field(default=0.99, ge=0, le=1)
    target: str | None = Field(default=None, pattern=r"^(budget|gap):[0-9.]+$")
    policy: RoutingPolicy | None = None
    cloud_model: str | None = Field(default=None, pattern=_REF)

    def gate(self) -> QuantizeOptions:
        cloud = _ref(self.cloud_model) if self.cloud_model else None
        target = RoutingTarget.parse(self.target or ("gap:0.8" if cloud else "budget:0.2"))
        return QuantizeOptions(
            max_drop_pt=self.max_drop_pt,
            min_cosine=self.min_cosine,
            target=target,
            policy=self.policy,
            cloud_model=cloud,
        )


class PruneRequest(GateRequest):
    method: PruneMethod = PruneMethod.STRUCTURED
    sparsity: float = Field(ge=0, lt=1, description="share of weights (magnitude) or neurons "
                            "(structured) removed, in [0, 1)")  # fmt: skip
    fine_tune: bool = False
    fine_tune_epochs: int = Field(default=30, ge=1, le=1000)
    quantize: bool = Field(default=False, description="INT8 after pruning")

    def options(self) -> PruneOptions:
        return PruneOptions(
            method=self.method,
            sparsity=self.sparsity,
            fine_tune=self.fine_tune,
            fine_tune_epochs=self.fine_tune_epochs,
            quantize=self.quantize,
            gate=self.gate(),
        )


class DistillRequest(GateRequest):
    student: str = Field(max_length=40, description="mlp:64,32 or mlp:32,16:pool2")
    teacher: str = Field(pattern=_REF, description="NAME:VERSION of a registered classifier")
    teacher_output: str = Field(default="probabilities", min_length=1, max_length=256)
    max_drop_pt: float = Field(default=2.0, ge=0, le=100)
    temperature: float = Field(default=8.0, gt=0, le=100)
    alpha: float = Field(default=0.9, ge=0, le=1, description="weight of the soft (KL) loss")
    epochs: int = Field(default=150, ge=1, le=2000)
    learning_rate: float = Field(default=3e-3, gt=0, le=1)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    baseline: bool = True

    def options(self) -> DistillOptions:
        train = TrainOptions(
            epochs=self.epochs,
            learning_rate=self.learning_rate,
            temperature=self.temperature,
            alpha=self.alpha,
            seed=self.seed,
        )
        return DistillOptions(
            arch=StudentArch.parse(self.student),
            train=train,
            teacher_output=self.teacher_output,
            baseline=self.baseline,
            gate=self.gate(),
        )


class Fp16Request(GateRequest):
    def options(self) -> Fp16Options:
        return Fp16Options(gate=self.gate())


class VersionReport(BaseModel):
    version: int
    precision: str
    source: str
    parent_version: int | None
    teacher: str | None
    size: int
    size_ratio: float | None = Field(description="size / its parent's (or teacher's)")
    latency_ratio: float | None = Field(
        description="p50 / its parent's, batch 1, one thread, timed side by side at "
        "registration; none for FP16 versions timed on a CPU (FP16 pays off on a GPU)"
    )
    accuracy: float | None
    accuracy_drop_pt: float | None
    cosine_mean: float | None
    apgr: float | None
    apgr_cloud_model: str | None


class CompressionReport(BaseModel):
    model: str
    versions: list[VersionReport]


async def _dataset(dataset: UploadFile | None) -> bytes | None:
    raw = await dataset.read(MAX_DATASET_BYTES + 1) if dataset is not None else None
    if raw is not None and len(raw) > MAX_DATASET_BYTES:
        raise InvalidInput(f"dataset over {MAX_DATASET_BYTES} bytes")
    return raw


def _public(context: CloudContext, model: str, version: int) -> VersionPublic:
    with context.database.session() as s:
        return version_public(repository.get_version(s, model_name=model, version=version))


Options = Annotated[str | None, Form(description="JSON options")]
Dataset = Annotated[
    UploadFile | None, File(description=".npz: inputs (x or by input name) and labels y")
]


@router.post(
    "/v1/models/{name}/versions/{version}/prune",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionPublic,
    responses=_REFUSED,
)
async def prune(
    name: ModelName,
    version: VersionNumber,
    context: ContextDep,
    actor: AdminAuth,
    options: Options = None,
    dataset: Dataset = None,
) -> VersionPublic:
    """Prune an FP32 version (PruneRequest), optionally fine-tune and quantize it, gate it
    against its parent and register it as a child version."""
    request = parse_json_field(options, PruneRequest, field="options")
    raw = await _dataset(dataset)

    def work() -> VersionPublic:
        with admitted(context, name):
            new = prune_version(
                context, model=name, version=version, upload=raw, options=request.options(),
                actor=actor,
            )  # fmt: skip
        return _public(context, name, new)

    return await run_in_threadpool(work)


@router.post(
    "/v1/models/{name}/versions/{version}/fp16",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionPublic,
    responses=_REFUSED,
)
async def fp16(
    name: ModelName,
    version: VersionNumber,
    context: ContextDep,
    actor: AdminAuth,
    options: Options = None,
    dataset: Dataset = None,
) -> VersionPublic:
    """Convert an FP32 version to FP16 (FP32 inputs and outputs kept), gated against it;
    the inference service serves FP16 versions as 'latest' only on CUDA."""
    request = parse_json_field(options, Fp16Request, field="options")
    raw = await _dataset(dataset)

    def work() -> VersionPublic:
        with admitted(context, name):
            new = fp16_version(
                context, model=name, version=version, upload=raw, options=request.options(),
                actor=actor,
            )  # fmt: skip
        return _public(context, name, new)

    return await run_in_threadpool(work)


@router.post(
    "/v1/models/{name}/distill",
    status_code=status.HTTP_201_CREATED,
    response_model=VersionPublic,
    responses=_REFUSED,
)
async def distill(
    name: ModelName,
    context: ContextDep,
    actor: AdminAuth,
    options: Annotated[str, Form(description="JSON: DistillRequest")],
    dataset: Dataset = None,
) -> VersionPublic:
    """Train a student (DistillRequest.student) on the teacher's softened outputs and the
    labels, gate it against the teacher, and register it as the next version of ``name``
    (created if new); the teacher is recorded in its metrics."""
    request = parse_json_field(options, DistillRequest, field="options")
    distill_options = request.options()
    teacher = _ref(request.teacher)
    raw = await _dataset(dataset)

    def work() -> VersionPublic:
        with admitted(context, name):  # the student's model: that is what it writes
            new = distill_version(
                context, student_model=name, teacher=teacher, upload=raw,
                options=distill_options, actor=actor,
            )  # fmt: skip
        return _public(context, name, new)

    return await run_in_threadpool(work)


@router.get("/v1/models/{name}/compression", response_model=CompressionReport)
async def report(
    name: ModelName,
    context: ContextDep,
    _actor: AdminAuth,
    cloud_model: Annotated[
        str | None, Query(pattern=_REF, description="NAME:VERSION to compute APGR against")
    ] = None,
) -> CompressionReport:
    """Each version's size, latency ratio to its parent, accuracy or cosine, and APGR."""
    cloud = _ref(cloud_model) if cloud_model else None
    rows = await run_in_threadpool(compression_report, context, name, cloud_model=cloud)
    return CompressionReport(
        model=name, versions=[VersionReport.model_validate(r, from_attributes=True) for r in rows]
    )
