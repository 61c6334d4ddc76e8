"""The device row lock and migration 0004, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from cloud.registry import repository
from cloud.registry.database import MIGRATIONS, Database
from shared.errors import NotFound


def test_locked_read_modify_writes_of_one_device_do_not_overwrite_each_other(
    database: Database,
) -> None:
    """Twenty units of work each read the device's rev and write it + 1 after a pause that
    invites interleaving: under the lock none is lost."""
    with database.session() as s:
        repository.enroll_device(s, device_id="cam")
    start = threading.Barrier(20)
    errors: list[BaseException] = []

    def bump() -> None:
        start.wait()
        try:
            with database.session() as s:
                device = repository.lock_device(s, device_id="cam")
                seen = device.desired_rev
                time.sleep(0.005)
                device.desired_rev = seen + 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bump) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    with database.session() as s:
        assert repository.get_device(s, device_id="cam").desired_rev == 20


def test_locking_an_unknown_device_is_not_found_and_holds_nothing(
    database: Database,
) -> None:
    with pytest.raises(NotFound), database.session() as s:
        repository.lock_device(s, device_id="ghost")
    with database.session() as s:
        repository.enroll_device(s, device_id="cam")
    with database.session() as s:
        assert repository.get_device(s, device_id="cam").presence == "unknown"


def _upgrade(url: str, revision: str) -> None:
    database = Database(url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    try:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        database.dispose()


def test_migration_0004_makes_documents_signed_before_it_due_for_renewal(
    database_url: str,
) -> None:
    """Before 0004 a signed document lived only in Redis and on the broker: a device with a
    rev gets a renewal time in the past, so the fleet re-signs it into SQL on start."""
    _upgrade(database_url, "0003")
    database = Database(database_url)
    try:
        with database.engine.begin() as conn:
            for device_id, rev in (("signed", 3), ("fresh", 0)):
                conn.execute(
                    text(
                        "INSERT INTO devices (id, name, labels, token_hash, presence, reported,"
                        " desired_rev, desired, created_at) VALUES (:id, '', '{}', :token,"
                        " 'unknown', '{}', :rev, '{}', :now)"
                    ),
                    {"id": device_id, "token": device_id, "rev": rev, "now": datetime.now(UTC)},
                )
        _upgrade(database_url, "0004")
        with database.session() as s:
            signed = repository.get_device(s, device_id="signed")
            fresh = repository.get_device(s, device_id="fresh")
        assert signed.desired_document is None
        renew_at = signed.desired_renew_at
        assert renew_at is not None
        assert (renew_at if renew_at.tzinfo else renew_at.replace(tzinfo=UTC)) < datetime.now(UTC)
        assert fresh.desired_renew_at is None
    finally:
        database.dispose()


def test_a_locked_device_still_gets_its_status_events_on_postgresql(database: Database) -> None:
    """The lock is FOR NO KEY UPDATE: a status event (its foreign key takes KEY SHARE on the
    device) is stored while a change to that device is under way, instead of waiting for it.
    SQLite's equivalent is the database's write lock, which every writer waits for."""
    if database.engine.dialect.name != "postgresql":
        pytest.skip("row locks are PostgreSQL's")
    with database.session() as s:
        repository.enroll_device(s, device_id="cam")
    with database.session() as s:
        repository.lock_device(s, device_id="cam")
        with database.engine.connect() as other:
            # A lock wait would end in an error here, not in a slow pass.
            other.execute(text("SET lock_timeout = '2s'"))
            other.execute(
                text(
                    "INSERT INTO deployment_events (device_id, rev, state, bytes_done,"
                    " bytes_total, at, received_at) VALUES ('cam', 1, 'QUEUED', 0, 0, :at, :at)"
                ),
                {"at": datetime.now(UTC)},
            )
            other.commit()
    with database.session() as s:
        count = s.scalar(text("SELECT count(*) FROM deployment_events WHERE device_id = 'cam'"))
    assert count == 1
