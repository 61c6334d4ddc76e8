"""A running cloud API with a fleet worth looking at, for the dashboard's tests: the reference
models (FP32 and gated INT8 with a calibration curve), enrolled devices whose presence,
reported state, status events and ten minutes of telemetry came through the real ingest, and
a rollout of the INT8 model to the lab."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.federated.plan import RoundReport
from cloud.federated.schemas import RunState
from cloud.federated.store import record_rounds, set_state
from cloud.pipeline.reference.build import register_reference
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN, seed_reference_cache, serve_in_thread
from tests.history_support import feed, status, telemetry

DEVICES = 40
MINUTES = 10


@dataclass(frozen=True)
class FleetApi:
    url: str
    context: CloudContext
    rollout_id: int
    federated_run_id: int

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def get(self, path: str, **params: object) -> dict[str, object]:
        with self.client() as client:
            answer = client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        body: dict[str, object] = answer.json()
        return body


def device_ids(count: int = DEVICES) -> list[str]:
    return [f"cam-{i:03d}" for i in range(count)]


def fleet_reports(ids: list[str], now: datetime) -> list[tuple[str, DeviceTopic, bytes]]:
    """Presence (most online), the INT8 model active on most, ``MINUTES`` of telemetry with
    some offload, a few degraded answers, and deployment events."""
    reports: list[tuple[str, DeviceTopic, bytes]] = []
    for index, device_id in enumerate(ids):
        presence = "online" if index % 8 else ("offline" if index % 16 else "stopped")
        reports.append((device_id, DeviceTopic.PRESENCE, json.dumps({"state": presence}).encode()))
        active = {"digits-edge": 2 if index % 5 else 1}
        reported = {"rev_applied": 1, "active": active, "agent_version": "test"}
        reports.append((device_id, DeviceTopic.REPORTED, json.dumps(reported).encode()))
        for minute in range(MINUTES):
            at = now - timedelta(minutes=MINUTES - minute, seconds=-30)
            rows = 20 + index % 7
            window = telemetry(
                at, edge=rows - 3, cloud=3, rows=rows, hard=3 + index % 3, cloud_rows=3,
                degraded=int(index % 13 == 0), degraded_rows=int(index % 13 == 0),
                errors=int(minute == 0 and index % 10 == 0),
                latency={3: rows - 4, 5: 3, 8: 1}, active=active,
            )  # fmt: skip
            reports.append((device_id, DeviceTopic.TELEMETRY, window))
        reports.append((device_id, DeviceTopic.STATUS, status(now, "DOWNLOADING", rev=1)))
        final = "FAILED" if index % 11 == 0 else "ACTIVE"
        reports.append((device_id, DeviceTopic.STATUS, status(now, final, rev=1)))
    return reports


ROUNDS = [
    RoundReport(round=r, clients=20 - r, dropped=r - 1, refused=0, examples=600 - 40 * r,
                train_loss=1.2 / r, wall_s=8.0 + r, bytes_down=1_500_000, bytes_up=1_400_000)
    for r in (1, 2, 3)
]  # fmt: skip


def finish_federated_run(context: CloudContext, run_id: int) -> None:
    """The run as the coordinator leaves it after three rounds (no SuperLink here): its
    rounds stored, COMPLETED with version 2 (the INT8 child of the base) as its result."""
    with context.database.session() as s:
        record_rounds(s, run_id, ROUNDS)
        base = repository.get_version(s, model_name="digits-edge", version=1)
        int8 = repository.get_version(s, model_name="digits-edge", version=2)
        assert set_state(
            s, run_id, expect=(RunState.PENDING,), to=RunState.COMPLETED,
            result_version_id=base.id, result_int8_version_id=int8.id,
            metrics={"gate": {"base_accuracy": 0.91, "result_accuracy": 0.93}},
        )  # fmt: skip


@pytest.fixture(scope="module")
def fleet_api(
    tmp_path_factory: pytest.TempPathFactory,
    embedded: ServiceUrls,
    reference_onnx: dict[str, bytes],
) -> Iterator[FleetApi]:
    data_dir: Path = tmp_path_factory.mktemp("dashboard") / "cloud"
    settings = CloudSettings(data_dir=data_dir, admin_token=ADMIN_TOKEN, chunk_size=4096)
    seed_reference_cache(settings, reference_onnx)
    urls = ServiceUrls(settings.resolved_database_url, "mqtt://127.0.0.1:9", embedded.redis_url)
    context = CloudContext.open(settings, urls)
    # The session's Redis: nothing another test left there (a budget in force, live views).
    context.redis.flushdb()
    register_reference(context, names=["digits-edge"], actor="test")
    ids = device_ids()
    with context.database.session() as s:
        for index, device_id in enumerate(ids):
            labels = {"site": "lab" if index % 2 else "field"}
            if index < 4:
                labels["tier"] = "canary"
            repository.enroll_device(s, device_id=device_id, labels=labels)
    feed(context, fleet_reports(ids, datetime.now(UTC)))
    try:
        with serve_in_thread(create_app(context)) as url:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
            ) as client:
                answer = client.post(
                    "/v1/rollouts",
                    json={"model": "digits-edge", "version": 2, "selector": {"site": "lab"},
                          "strategy": {"canary": 2, "growth": 3}},
                )  # fmt: skip
                assert answer.status_code == 201, answer.text
                run = client.post(
                    "/v1/federated/runs",
                    json={"model": "digits-edge", "base_version": 1, "rounds": 3,
                          "selector": {"site": "lab"}},
                )  # fmt: skip
                assert run.status_code == 201, run.text
            federated_run_id = int(run.json()["id"])
            finish_federated_run(context, federated_run_id)
            yield FleetApi(url, context, int(answer.json()["id"]), federated_run_id)
    finally:
        context.close()
