"""Registering the same bytes from several threads, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from cloud.artifacts.store import ArtifactStore
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.database import Database
from cloud.registry.tables import Artifact, ModelVersion
from shared.errors import EdgeFleetError, InvalidInput
from tests.onnx_models import tiny_classifier


def _together(calls: list[Callable[[], object]]) -> list[object]:
    """Each call on its own thread, released at once; what each returned or raised."""
    barrier = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the outcome is what the test looks at
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def _register(
    database: Database, store: ArtifactStore, model: str, data: bytes, **extra: object
) -> Callable[[], object]:
    def call() -> object:
        with database.session() as s:
            return register_version(
                s, store, model_name=model, blocks=[data], max_bytes=1 << 20,
                precision="fp32", actor="test", **extra,  # type: ignore[arg-type]
            ).version  # fmt: skip

    return call


def _rolled_back(database: Database, store: ArtifactStore, data: bytes) -> Callable[[], object]:
    """A registration whose unit of work fails after the version row was written."""

    def call() -> object:
        with database.session() as s:
            register_version(
                s, store, model_name="e", blocks=[data], max_bytes=1 << 20,
                precision="fp32", actor="test",
            )  # fmt: skip
            raise EdgeFleetError("a later step of the same unit of work failed")

    return call


def test_same_bytes_registered_refused_and_rolled_back_at_once(
    database: Database, tmp_path: Path
) -> None:
    """Per round, with new bytes: two registrations commit, two are refused (a trainable name
    the graph lacks), one rolls back after writing its rows. Both commits succeed, the file
    of their versions is there, and the artifact has exactly one row."""
    store = ArtifactStore(tmp_path / "artifacts", chunk_size=4096)
    with database.session() as s:
        for name in "abcde":
            repository.create_model(s, name=name)
    for seed in range(4):
        data = tiny_classifier(seed=200 + seed)
        bad = {"trainable": ["no.such.tensor"]}
        results = _together(
            [
                _register(database, store, "a", data),
                _register(database, store, "b", data),
                _register(database, store, "c", data, **bad),
                _register(database, store, "d", data, **bad),
                _rolled_back(database, store, data),
            ]
        )
        assert results[:2] == [seed + 1, seed + 1], results
        assert all(isinstance(r, InvalidInput) for r in results[2:4]), results
        assert isinstance(results[4], EdgeFleetError), results
        with database.session() as s:
            sha = repository.get_version(s, model_name="a", version=seed + 1).artifact_sha256
            rows = s.scalar(
                select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha)
            )
        assert rows == 1
        assert store.path(sha).read_bytes() == data
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(ModelVersion)) == 8


def test_a_rolled_back_registration_alone_leaves_no_file(
    database: Database, tmp_path: Path
) -> None:
    """Nothing else uses the bytes: the rollback removes the file it placed."""
    store = ArtifactStore(tmp_path / "artifacts", chunk_size=4096)
    with database.session() as s:
        repository.create_model(s, name="e")
    data = tiny_classifier(seed=300)
    with pytest.raises(EdgeFleetError, match="later step"):
        _rolled_back(database, store, data)()
    assert [p for p in store.root.rglob("*") if p.is_file()] == []
    with database.session() as s:
        assert s.scalar(select(func.count()).select_from(Artifact)) == 0
