"""Fixtures for the security probes: the cloud API on each registry backend."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.settings import CloudSettings
from tests.conftest import RunningApi, serve_in_thread


@pytest.fixture
def backend_api(
    database_url: str, settings: CloudSettings, embedded: ServiceUrls
) -> Iterator[RunningApi]:
    """The cloud API on a real uvicorn, its registry on SQLite and then on PostgreSQL: the
    two refuse different values (int64 vs int4, NUL in text, NaN in JSON)."""
    context = CloudContext.open(
        settings, ServiceUrls(database_url, embedded.mqtt_url, embedded.redis_url)
    )
    context.redis.flushdb()
    try:
        with serve_in_thread(create_app(context)) as url:
            yield RunningApi(url, context)
    finally:
        context.close()
