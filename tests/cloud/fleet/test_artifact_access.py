"""Which artifacts a device may have broadcast: its desired state's, read for many devices at
once and cached."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event

from cloud.context import CloudContext
from cloud.fleet.access import ArtifactAccess
from cloud.fleet.desired import desired_artifacts, set_deployment
from cloud.registry import repository
from cloud.registry.tables import Device
from tests.cloud.fleet.desired_support import add_models, enroll, sign_deployment
from tests.cloud.rollout.support import devices


@contextmanager
def _selects(context: CloudContext) -> Iterator[list[str]]:
    seen: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if sql.lstrip().upper().startswith("SELECT"):
            seen.append(sql)

    event.listen(context.database.engine, "before_cursor_execute", statement)
    try:
        yield seen
    finally:
        event.remove(context.database.engine, "before_cursor_execute", statement)


def test_many_devices_are_read_in_two_queries_and_answered_as_one_by_one(
    context: CloudContext,
) -> None:
    """600 devices on version 1 of alpha, one on version 2, one with nothing deployed and an
    id the registry does not have: one call reads them all in a few queries (not two per
    device), and each answer is what desired_artifacts says of that device; asked again,
    the cache answers without a query."""
    add_models(context, ("alpha",))
    ids = devices(context, 600)
    other, bare = enroll(context), enroll(context)
    with context.database.session() as s:
        for device_id, version in [*((d, 1) for d in ids), (other, 2)]:
            device = repository.lock_device(s, device_id=device_id)
            row = repository.get_version(s, model_name="alpha", version=version)
            set_deployment(device=device, version=row)
        s.flush()
        truth = {
            device_id: desired_artifacts(s, device=s.get(Device, device_id))  # type: ignore[arg-type]
            for device_id in (ids[0], other, bare)
        }
    v1, v2 = next(iter(truth[ids[0]])), next(iter(truth[other]))
    asks = [(d, v1) for d in ids] + [(other, v1), (other, v2), (bare, v1), ("nobody", v1)]
    access = ArtifactAccess(context)
    with _selects(context) as selects:
        answers = access.allowed_many(asks)
    assert answers == [True] * 600 + [False, True, False, False]
    assert len(selects) <= 4, selects  # two queries for each 500 devices
    with _selects(context) as selects:
        assert access.allowed_many([(ids[5], v1), (other, v2)]) == [True, True]
        assert access.allowed(ids[9], v1)
    assert selects == []


def test_a_device_given_a_new_version_is_allowed_it_at_once(context: CloudContext) -> None:
    """Cached without the new version's artifact (and read over a second ago), a device
    asking for it is read again and allowed."""
    add_models(context, ("alpha",))
    device_id = enroll(context)
    now = [100.0]
    access = ArtifactAccess(context, clock=lambda: now[0])
    with context.database.session() as s:
        device = repository.lock_device(s, device_id=device_id)
        set_deployment(device=device, version=repository.get_version(s, model_name="alpha",
                                                                      version=1))  # fmt: skip
        v1 = next(iter(desired_artifacts(s, device=device)))
        set_deployment(device=device, version=repository.get_version(s, model_name="alpha",
                                                                      version=2))  # fmt: skip
        v2 = next(iter(desired_artifacts(s, device=device)))
        set_deployment(device=device, version=repository.get_version(s, model_name="alpha",
                                                                      version=1))  # fmt: skip
    assert access.allowed_many([(device_id, v1), (device_id, v2)]) == [True, False]
    sign_deployment(context, device_id, "alpha", 2)
    now[0] += 2.0
    assert access.allowed_many([(device_id, v2)]) == [True]
