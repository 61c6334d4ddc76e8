"""The registry contract, run on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from cloud.registry import repository
from cloud.registry.database import Database
from cloud.registry.tables import Base
from shared.errors import Conflict, NotFound, ProtocolError, Unauthorized


def _artifact(db: Database, sha: str = "b" * 64) -> None:
    with db.session() as s:
        repository.put_artifact(s, sha256=sha, size=10, chunk_size=4096, chunk_hashes=["c" * 64])


def _io() -> dict[str, list[dict[str, object]]]:
    spec = [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    return {"inputs": spec, "outputs": spec}


def test_migrations_build_exactly_the_declared_schema(database: Database) -> None:
    with database.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_migrating_twice_is_harmless(database: Database) -> None:
    database.migrate()
    with database.session() as s:
        assert repository.list_models(s) == []


def test_model_names_are_unique(database: Database) -> None:
    with database.session() as s:
        repository.create_model(s, name="digits", description="8x8 digits")
    with pytest.raises(Conflict), database.session() as s:
        repository.create_model(s, name="digits")
    with database.session() as s:
        assert [m.name for m in repository.list_models(s)] == ["digits"]


def test_versions_are_monotonic_and_keep_their_parent(database: Database) -> None:
    _artifact(database)
    with database.session() as s:
        model = repository.create_model(s, name="digits")
        artifact = repository.get_artifact(s, sha256="b" * 64)
        v1 = repository.add_version(s, model=model, artifact=artifact, precision="fp32", **_io())
        v2 = repository.add_version(
            s, model=model, artifact=artifact, precision="int8", parent=v1,
            metrics={"accuracy": 0.98}, routing={"policy": "max_prob", "threshold": 0.9}, **_io(),
        )  # fmt: skip
        assert (v1.version, v2.version, v2.parent_id) == (1, 2, v1.id)
    with database.session() as s:
        got = repository.get_version(s, model_name="digits", version=2)
        assert got.metrics == {"accuracy": 0.98}
        assert got.routing == {"policy": "max_prob", "threshold": 0.9}
        assert [v.version for v in repository.list_versions(s, model_name="digits")] == [1, 2]


def test_unknown_models_versions_and_artifacts_are_not_found(database: Database) -> None:
    with database.session() as s:
        with pytest.raises(NotFound):
            repository.get_model(s, name="nope")
        with pytest.raises(NotFound):
            repository.get_artifact(s, sha256="0" * 64)
        repository.create_model(s, name="m")
    with database.session() as s, pytest.raises(NotFound, match="no version 7"):
        repository.get_version(s, model_name="m", version=7)


def test_a_parent_from_another_model_is_refused(database: Database) -> None:
    _artifact(database)
    with database.session() as s:
        a = repository.create_model(s, name="a")
        b = repository.create_model(s, name="b")
        artifact = repository.get_artifact(s, sha256="b" * 64)
        va = repository.add_version(s, model=a, artifact=artifact, precision="fp32", **_io())
        with pytest.raises(Conflict, match="another model"):
            repository.add_version(
                s, model=b, artifact=artifact, precision="fp32", parent=va, **_io()
            )


def test_the_same_artifact_recorded_twice_is_one_row(database: Database) -> None:
    _artifact(database)
    _artifact(database)
    with database.session() as s:
        assert repository.get_artifact(s, sha256="b" * 64).size == 10


def test_device_tokens_are_stored_hashed_and_authenticate(database: Database) -> None:
    with database.session() as s:
        device, token = repository.enroll_device(s, device_id="cam-1", labels={"site": "a"})
        assert device.token_hash != token
        assert token not in device.token_hash
    with database.session() as s:
        assert repository.authenticate_device(s, token=token).id == "cam-1"
        with pytest.raises(Unauthorized):
            repository.authenticate_device(s, token=token + "x")


def test_devices_are_unique_and_ids_validated(database: Database) -> None:
    with database.session() as s:
        repository.enroll_device(s, device_id="cam-1")
    with pytest.raises(Conflict), database.session() as s:
        repository.enroll_device(s, device_id="cam-1")
    with pytest.raises(ProtocolError), database.session() as s:
        repository.enroll_device(s, device_id="bad/id")
    with database.session() as s:
        assert [d.id for d in repository.list_devices(s)] == ["cam-1"]


def test_devices_are_selected_by_labels(database: Database) -> None:
    with database.session() as s:
        repository.enroll_device(s, device_id="a", labels={"site": "x", "tier": "canary"})
        repository.enroll_device(s, device_id="b", labels={"site": "x"})
        repository.enroll_device(s, device_id="c", labels={"site": "y"})
    with database.session() as s:
        assert [d.id for d in repository.list_devices(s, labels={"site": "x"})] == ["a", "b"]
        got = repository.list_devices(s, labels={"site": "x", "tier": "canary"})
        assert [d.id for d in got] == ["a"]


def test_presence_and_last_seen_are_recorded(database: Database) -> None:
    with database.session() as s:
        repository.enroll_device(s, device_id="a")
    with database.session() as s:
        repository.touch_device(s, device_id="a", presence="online")
    with database.session() as s:
        device = repository.get_device(s, device_id="a")
        assert device.presence == "online"
        assert device.last_seen_at is not None


def test_audit_events_list_newest_first(database: Database) -> None:
    with database.session() as s:
        for i in range(3):
            repository.record_audit(s, actor="admin", action="x", subject=str(i), detail={"i": i})
    with database.session() as s:
        events = repository.list_audit(s, limit=2)
        assert [e.subject for e in events] == ["2", "1"]
        assert events[0].detail == {"i": 2}


def test_a_failed_unit_of_work_leaves_nothing(database: Database) -> None:
    def crash_mid_transaction() -> None:
        with database.session() as s:
            repository.create_model(s, name="half")
            raise RuntimeError("crash mid-transaction")

    with pytest.raises(RuntimeError):
        crash_mid_transaction()
    with database.session() as s:
        assert repository.list_models(s) == []
