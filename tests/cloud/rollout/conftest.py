"""Fixtures for the rollout store and engine: a cloud context on SQLite or PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from tests.cloud.fleet.desired_support import add_models, open_context


@pytest.fixture
def cloud(tmp_path: Path, database_url: str, embedded: ServiceUrls) -> Iterator[CloudContext]:
    """A cloud context on each registry backend, with three versions of the model ``alpha``
    and an empty Redis (the lease and fencing counter start from nothing)."""
    context = open_context(
        tmp_path, database_url=database_url, mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url,
    )  # fmt: skip
    context.redis.flushdb()
    add_models(context, ("alpha",), versions=3)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def sqlite_cloud(context: CloudContext) -> CloudContext:
    """The cloud context on SQLite only (for rules that do not depend on the backend)."""
    add_models(context, ("alpha",), versions=3)
    return context
