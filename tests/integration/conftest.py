"""Integration fixtures: the cloud on the embedded broker or on the machine's Mosquitto."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.settings import CloudSettings
from tests.fleet_harness import Cloud, running_cloud
from tests.services import MOSQUITTO, need


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_url(request: pytest.FixtureRequest, embedded: ServiceUrls) -> str:
    if request.param == "mosquitto":
        need(MOSQUITTO)
        return "mqtt://127.0.0.1:1883"
    return embedded.mqtt_url


def _cloud_context(settings: CloudSettings, embedded: ServiceUrls, mqtt_url: str) -> CloudContext:
    urls = ServiceUrls(settings.resolved_database_url, mqtt_url, embedded.redis_url)
    context = CloudContext.open(settings, urls)
    context.redis.flushdb()  # nothing another test left behind
    return context


@contextmanager
def _cloud(settings: CloudSettings, embedded: ServiceUrls, mqtt_url: str) -> Iterator[Cloud]:
    context = _cloud_context(settings, embedded, mqtt_url)
    try:
        with running_cloud(context) as running:
            yield running
    finally:
        context.close()


@pytest.fixture
def cloud(settings: CloudSettings, embedded: ServiceUrls, broker_url: str) -> Iterator[Cloud]:
    """The real cloud on either broker."""
    with _cloud(settings, embedded, broker_url) as running:
        yield running


@pytest.fixture
def embedded_cloud(settings: CloudSettings, embedded: ServiceUrls) -> Iterator[Cloud]:
    """The real cloud on the embedded broker only (for the slower fault tests)."""
    with _cloud(settings, embedded, embedded.mqtt_url) as running:
        yield running


@pytest.fixture
def agent_dir(tmp_path: Path) -> Path:
    return tmp_path / "agents"
