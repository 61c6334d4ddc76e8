"""The machine's services for tests: present, or skipped with a reason (failed under CI)."""

from __future__ import annotations

import os
import socket

import pytest

__all__ = ["MOSQUITTO", "POSTGRES", "REDIS", "need"]

POSTGRES = ("PostgreSQL", "127.0.0.1", 5432, "EDGEFLEET_TEST_POSTGRES_URL")
REDIS = ("Redis", "127.0.0.1", 6379, "EDGEFLEET_TEST_REDIS_URL")
MOSQUITTO = ("Mosquitto", "127.0.0.1", 1883, "EDGEFLEET_TEST_MQTT_URL")


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def need(service: tuple[str, str, int, str]) -> None:
    """Skip (or, with EDGEFLEET_REQUIRE_SERVICES=1, fail) when ``service`` is not running."""
    name, host, port, _ = service
    if _reachable(host, port):
        return
    reason = f"{name} is not running on {host}:{port}"
    if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
    pytest.skip(reason)
