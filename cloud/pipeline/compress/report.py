"""The compression report of one model: per version, its size, its p50 latency beside its
parent's (as timed side by side when it was registered), its accuracy or cosine, and the
routing curve's APGR against a cloud model where one is named."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cloud.context import CloudContext
from cloud.pipeline.compress.children import check_cloud_model
from cloud.pipeline.compress.data import compress_data
from cloud.pipeline.compress.measure import apgr
from cloud.pipeline.evaluate import make_session, run_model
from cloud.pipeline.service import load_version_bytes
from cloud.registry import repository
from cloud.registry.tables import ModelVersion
from shared.errors import EdgeFleetError, InvalidInput, NotFound
from shared.messages import RoutingSpec, TensorSpec
from shared.routing import spec_confidence

__all__ = ["VersionFigures", "compression_report"]

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclass(frozen=True, slots=True)
class VersionFigures:
    version: int
    precision: str
    source: str
    parent_version: int | None
    teacher: str | None  # "model:version" of a distilled student's teacher
    size: int
    size_ratio: float | None  # to its parent (or teacher)
    # p50 child / parent, batch 1, 1 thread, timed side by side; None for FP16 timed on CPU
    latency_ratio: float | None
    accuracy: float | None
    accuracy_drop_pt: float | None
    cosine_mean: float | None
    apgr: float | None
    apgr_cloud_model: str | None


@dataclass(frozen=True, slots=True)
class _Row:
    figures: dict[str, Any]
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[str]
    routing: RoutingSpec | None
    dataset: str | None


def _read(row: ModelVersion, sizes: dict[int, int]) -> _Row:
    metrics = row.metrics or {}
    parent = next((v for v in row.model.versions if v.id == row.parent_id), None)
    teacher = metrics.get("teacher")
    base = sizes.get(parent.version) if parent is not None else None
    if teacher is not None:
        base = metrics.get("parent_size_bytes")
    latency = metrics.get("latency") or {}
    if row.precision == "fp16" and latency.get("provider") not in _GPU_PROVIDERS:
        latency = {}  # timed on a CPU, where FP16 runs through casts: not what a GPU serves
    figures = {
        "version": row.version,
        "precision": row.precision,
        "source": row.source,
        "parent_version": parent.version if parent is not None else None,
        "teacher": f"{teacher['model']}:{teacher['version']}" if teacher else None,
        "size": row.artifact.size,
        "size_ratio": round(row.artifact.size / base, 4) if base else None,
        "latency_ratio": latency.get("latency_ratio"),
        "accuracy": metrics.get("accuracy"),
        "accuracy_drop_pt": metrics.get("accuracy_drop_pt"),
        "cosine_mean": metrics.get("cosine_mean"),
        "apgr": metrics.get("apgr"),
        "apgr_cloud_model": None,
    }
    routing = RoutingSpec.model_validate(row.routing) if row.routing else None
    if figures["apgr"] is not None and routing is not None and routing.cloud_model is not None:
        figures["apgr_cloud_model"] = f"{routing.cloud_model.name}:{routing.cloud_model.version}"
    return _Row(
        figures,
        row.artifact_sha256,
        [TensorSpec.model_validate(i) for i in row.inputs],
        [o["name"] for o in row.outputs],
        routing,
        row.dataset,
    )


def _apgr_now(context: CloudContext, row: _Row, cloud: tuple[str, int]) -> float | None:
    """APGR of ``row`` against ``cloud`` on its built-in dataset's held-out split (an
    uploaded dataset is not kept, so such versions keep only what they recorded)."""
    if row.dataset is None or "probabilities" not in row.outputs:
        return None
    try:
        data = compress_data(upload=None, dataset=row.dataset, inputs=row.inputs).eval
    except EdgeFleetError:
        return None
    if data.test_labels is None:
        return None
    session = make_session(context.artifacts.path(row.sha256))
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, data.test_inputs), strict=True))
    cloud_probs = run_model(
        load_version_bytes(context, *cloud), data.test_inputs, output="probabilities"
    )
    conf = (
        spec_confidence(row.routing, outputs, data.test_inputs) if row.routing is not None else None
    )
    return apgr(outputs["probabilities"], cloud_probs, data.test_labels, conf)


def compression_report(
    context: CloudContext, model: str, *, cloud_model: tuple[str, int] | None = None
) -> list[VersionFigures]:
    """Every version of ``model``, oldest first. With ``cloud_model``, the APGR of each
    classifier version is computed now against that model (where its data is built in)."""
    with context.database.session() as s:
        versions = repository.list_versions(s, model_name=model)
        if cloud_model is not None:
            repository.get_version(s, model_name=cloud_model[0], version=cloud_model[1])
        sizes = {v.version: v.artifact.size for v in versions}
        rows = [_read(v, sizes) for v in versions]
    if not rows:
        raise NotFound(f"model {model!r} has no versions")
    for row in rows:
        if cloud_model is not None and "probabilities" in row.outputs:  # 400 before any run
            check_cloud_model(
                context, cloud_model, output="probabilities", inputs=[i.name for i in row.inputs]
            )
    report = []
    for row in rows:
        figures = dict(row.figures)
        cloud = cloud_model
        named = row.routing.cloud_model if row.routing is not None else None
        if cloud is None and figures["apgr"] is None and named and isinstance(named.version, int):
            cloud = (named.name, named.version)  # versions registered before APGR was kept
            try:
                check_cloud_model(
                    context, cloud, output="probabilities", inputs=[i.name for i in row.inputs]
                )
            except InvalidInput:
                cloud = None  # not asked for: the row keeps what it recorded
        if cloud is not None:
            figures["apgr"] = _apgr_now(context, row, cloud)
            figures["apgr_cloud_model"] = (
                f"{cloud[0]}:{cloud[1]}" if figures["apgr"] is not None else None
            )
        report.append(VersionFigures(**figures))
    return report
