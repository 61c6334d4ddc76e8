"""Helpers for tests of the fleet's history and state: device reports fed through the real
ingest (the same ``Ingest`` the fleet service runs, its history writer flushed at the end)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from datetime import datetime

from cloud.context import CloudContext
from cloud.fleet.ingest import Ingest
from cloud.history.rollup import HistoryWriter
from shared import topics
from shared.mqtt_inbound import Inbound
from shared.topics import DeviceTopic
from tests.fleet_harness import wait_for

__all__ = ["AGENT_BOUNDS_MS", "Acks", "feed", "status", "telemetry"]

# The agent's own bounds (edge_agent.telemetry.LATENCY_BOUNDS_MS), as its windows carry them.
AGENT_BOUNDS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


class Acks:
    """Counts what the ingest acknowledged (stored or dropped)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def ack_many(self, items: Sequence[Inbound]) -> None:
        with self._lock:
            self.count += len(items)


def telemetry(
    at: datetime,
    *,
    edge: int = 0,
    cloud: int = 0,
    errors: int = 0,
    degraded: int = 0,
    rows: int = 0,
    hard: int = 0,
    cloud_rows: int = 0,
    degraded_rows: int = 0,
    latency: dict[int, int] | None = None,
    active: dict[str, int] | None = None,
) -> bytes:
    """A telemetry window as an agent sends it; ``latency`` maps bucket index -> count."""
    counts = {
        "answers_edge": edge, "answers_cloud": cloud, "errors": errors, "degraded": degraded,
        "rows_total": rows, "rows_hard": hard, "rows_cloud": cloud_rows,
        "rows_degraded": degraded_rows,
    }  # fmt: skip
    buckets = [0] * (len(AGENT_BOUNDS_MS) + 1)
    for index, count in (latency or {}).items():
        buckets[index] = count
    return json.dumps(
        {
            "schema_version": 1,
            "window_s": 10.0,
            "counts": {k: v for k, v in counts.items() if v},
            "latency_ms": {"bounds": AGENT_BOUNDS_MS, "counts": buckets},
            "active": active or {},
            "at": at.isoformat(),
        }
    ).encode()


def status(at: datetime, state: str, *, rev: int = 1, model: str = "m", version: int = 1) -> bytes:
    return json.dumps(
        {"schema_version": 1, "rev": rev, "model": model, "version": version, "state": state,
         "at": at.isoformat()}
    ).encode()  # fmt: skip


def feed(
    context: CloudContext,
    reports: Sequence[tuple[str, DeviceTopic, bytes]],
    *,
    writer: HistoryWriter | None = None,
) -> HistoryWriter:
    """Put ``reports`` (device, kind, payload) through an ``Ingest`` with a history writer,
    wait until each is acknowledged, and flush the writer."""
    writer = writer or HistoryWriter(context.database, flush_s=3600)
    ingest = Ingest(context, history=writer)
    acks = Acks()
    for device_id, kind, payload in reports:
        qos = 0 if kind is DeviceTopic.TELEMETRY else 1
        ingest.submit(
            Inbound(topics.device_topic(device_id, kind), payload, qos, time.monotonic(), acks)
        )
    ingest.start()
    try:
        wait_for(lambda: acks.count == len(reports), 30, "every report acknowledged")
    finally:
        ingest.stop()
    assert not ingest.snapshot().dropped, ingest.snapshot().dropped
    writer.flush()
    return writer
