"""Fixtures: a real Mosquitto with the dynamic-security plugin, fresh for each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import DynsecBroker, dynsec_mosquitto


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DynsecBroker]:
    with dynsec_mosquitto(tmp_path / "broker") as running:
        yield running
