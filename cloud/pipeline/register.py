"""Register a model version from bytes: store, check, record; nothing stays if a step fails."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session, SessionTransaction

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
    # Checked while private: a refused upload never touches the file under its hash, which a
    # concurrent upload of the same bytes may be registering.
    with store.stage(blocks, max_bytes=max_bytes) as staged:
        summary = inspect_onnx(staged.path)
        missing = sorted(set(trainable or []) - summary.initializers)
        if missing:
            raise InvalidInput(f"trainable tensors not in the graph's initializers: {missing}")
        info = store.place(staged)
    _release_when_done(session, store, info.sha256)
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
    return version


def _release_when_done(session: Session, store: ArtifactStore, sha256: str) -> None:
    """Unpin the placed file when this unit of work ends, committed or rolled back; the store
    removes it only if no committed row names it by then (read on a connection of its own)."""
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    done = False

    def in_use() -> bool:
        with engine.connect() as connection:
            found = connection.scalar(select(Artifact.sha256).where(Artifact.sha256 == sha256))
        return found is not None

    def on_end(_session: Session, transaction: SessionTransaction) -> None:
        nonlocal done
        if not done and transaction.parent is None:
            done = True
            store.release(sha256, in_use=in_use)

    event.listen(session, "after_transaction_end", on_end)
