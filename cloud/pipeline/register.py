"""Register a model version from bytes: store, check, record; nothing stays if a step fails."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy.orm import Session

from cloud.artifacts.store import ArtifactStore
from cloud.pipeline.inspect import inspect_onnx
from cloud.registry import repository
from cloud.registry.tables import Artifact, ModelVersion
from shared.errors import InvalidInput
from shared.messages import HealthCheckSpec, RoutingSpec

__all__ = ["register_version"]


def register_version(
    session: Session,
    store: ArtifactStore,
    *,
    model_name: str,
    blocks: Iterable[bytes],
    max_bytes: int,
    precision: str,
    actor: str,
    parent_version: int | None = None,
    metrics: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    routing: RoutingSpec | None = None,
    trainable: list[str] | None = None,
    healthcheck: HealthCheckSpec | None = None,
    source: str = "upload",
    dataset: str | None = None,
    warnings: list[str] | None = None,
) -> ModelVersion:
    model = repository.get_model(session, name=model_name)
    parent = (
        repository.get_version(session, model_name=model_name, version=parent_version)
        if parent_version is not None
        else None
    )
    info = store.put_stream(blocks, max_bytes=max_bytes)
    known = session.get(Artifact, info.sha256) is not None
    try:
        summary = inspect_onnx(store.path(info.sha256))
        missing = sorted(set(trainable or []) - summary.initializers)
        if missing:
            raise InvalidInput(f"trainable tensors not in the graph's initializers: {missing}")
        artifact = repository.put_artifact(
            session,
            sha256=info.sha256,
            size=info.size,
            chunk_size=info.chunk_size,
            chunk_hashes=info.chunk_hashes,
        )
        version = repository.add_version(
            session,
            model=model,
            artifact=artifact,
            precision=precision,
            inputs=[s.model_dump() for s in summary.inputs],
            outputs=[s.model_dump() for s in summary.outputs],
            parent=parent,
            metrics=metrics,
            calibration=calibration,
            routing=routing.model_dump(mode="json") if routing else None,
            trainable=trainable,
            healthcheck=(healthcheck or HealthCheckSpec()).model_dump(mode="json"),
            source=source,
            dataset=dataset,
        )
        repository.record_audit(
            session,
            actor=actor,
            action="version.register",
            subject=f"{model_name}:{version.version}",
            detail={
                "sha256": info.sha256,
                "size": info.size,
                "precision": precision,
                **({"warnings": warnings} if warnings else {}),
            },
        )
    except BaseException:
        if not known:
            store.delete(info.sha256)
        raise
    return version
