"""`edgefleet simulate`'s fleet against the real cloud and a Mosquitto with the shipped limits:
simulated devices are real agents in `edge-agent simulate` worker processes. Twenty of them
take a rollout from one shared broadcast; each fault flag is shown to act on a few."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.registry import repository
from cloud.settings import CloudSettings
from cloud.simulate.broken import register_broken
from cloud.simulate.fleet import Faults, SimulatedFleet
from tests.conftest import ADMIN_TOKEN
from tests.fleet_harness import Cloud, running_cloud, wait_for
from tests.integration.test_crash_safety import _big_model
from tests.mosquitto import mosquitto

MODEL = "digits-edge"
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    """The cloud's default chunk size (a ~2 MB model is 8 chunks), a fast rollout engine."""
    return CloudSettings(
        data_dir=tmp_path / "cloud", admin_token=ADMIN_TOKEN, max_upload_bytes=8 * 1024 * 1024,
        rollout_tick_s=0.2,
    )  # fmt: skip


@pytest.fixture
def cloud(settings: CloudSettings, embedded: ServiceUrls, tmp_path: Path) -> Iterator[Cloud]:
    with mosquitto(tmp_path / "broker") as port:
        mqtt_url = f"mqtt://127.0.0.1:{port}"
        urls = ServiceUrls(settings.resolved_database_url, mqtt_url, embedded.redis_url)
        context = CloudContext.open(settings, urls)
        context.redis.flushdb()
        try:
            with running_cloud(context) as running:
                yield running
        finally:
            context.close()


@pytest.fixture
def fleets() -> Iterator[list[SimulatedFleet]]:
    started: list[SimulatedFleet] = []
    yield started
    for fleet in started:
        fleet.stop()


def _fleet(
    cloud: Cloud, fleets: list[SimulatedFleet], root: Path, agents: int, **faults: Any
) -> SimulatedFleet:
    fleet = SimulatedFleet(
        api_url=cloud.url, admin_token=ADMIN_TOKEN, root=root, agents=agents, processes=1,
        prefix="simt", faults=Faults(seed=3, **faults),
        agent_settings={"telemetry_interval_s": 1.0, "chunk_wait_s": 1.0},
    )  # fmt: skip
    fleets.append(fleet)
    fleet.enroll()
    fleet.start()
    fleet.wait_started(90)
    return fleet


def _size(cloud: Cloud, version: int) -> int:
    with cloud.context.database.session() as s:
        return repository.get_version(s, model_name=MODEL, version=version).artifact.size


def _roll_out(cloud: Cloud, version: int, **strategy: Any) -> dict[str, Any]:
    body = {"model": MODEL, "version": version, "selector": {"simulated": "simt"},
            "strategy": {"device_timeout_s": 120} | strategy}  # fmt: skip
    with cloud.admin() as c:
        created = c.post("/v1/rollouts", json=body)
        assert created.status_code == 201, created.text

        def over() -> dict[str, Any] | None:
            row: dict[str, Any] = c.get(f"/v1/rollouts/{created.json()['id']}").json()
            return row if row["state"] in ("COMPLETED", "ABORTED") else None

        return wait_for(over, 150, "the rollout to end")  # type: ignore[no-any-return]


def _events(cloud: Cloud, device_id: str) -> list[dict[str, Any]]:
    return list(reversed(cloud.events(device_id)))  # oldest first


def test_twenty_agents_in_one_process_share_one_broadcast(
    cloud: Cloud, fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """20 devices in one worker process go ACTIVE through a rollout (one wave); the cloud
    publishes at most 1.5 artifacts' worth of chunks for all of them; each device costs the
    process about two threads (its MQTT link and its deployer)."""
    fleet = _fleet(cloud, fleets, tmp_path / "sim", 20)
    version = cloud.register(MODEL, _big_model(5))
    before = cloud.fleet.chunks.bytes_published
    done = _roll_out(cloud, version, canary=20)
    assert done["state"] == "COMPLETED", done
    assert done["states"] == {"ACTIVE": 20}
    published = cloud.fleet.chunks.bytes_published - before
    assert _size(cloud, version) <= published <= 1.5 * _size(cloud, version)
    wait_for(lambda: fleet.status().serving(MODEL, version) == 20, 30, "every agent serving it")
    status = fleet.status()
    assert status.workers == 1
    assert status.threads_per_agent < 3
    telemetry = cloud.context.redis.hgetall("edgefleet:telemetry:messages")
    assert len(telemetry) == 20  # every device reports its telemetry, as a device does


def test_lost_chunks_are_asked_for_again(
    cloud: Cloud, fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """Every device drops 30 % of the chunks it receives before its store: chunks were
    dropped, the devices asked again, and all of them still activate the verified model."""
    fleet = _fleet(cloud, fleets, tmp_path / "sim", 3, chunk_loss=0.3)
    version = cloud.register(MODEL, _big_model(6))
    done = _roll_out(cloud, version, canary=3)
    assert done["states"] == {"ACTIVE": 3}, done
    assert fleet.status().chunks_dropped > 0
    assert cloud.fleet.chunks.bytes_published > _size(cloud, version)


def test_a_device_restarted_mid_download_resumes_from_its_disk(
    cloud: Cloud, fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """Both devices are stopped after their first chunk and started again, as fresh agents on
    the same data dir: each deploys the rev twice (QUEUED twice), the second time from the
    chunks already on disk, and ends ACTIVE. They are slow too, so the restart lands while
    the download is still going."""
    fleet = _fleet(
        cloud, fleets, tmp_path / "sim", 2, restart_share=1.0, slow_share=1.0, slow_delay_s=0.1
    )
    version = cloud.register(MODEL, _big_model(7))
    done = _roll_out(cloud, version, canary=2)
    assert done["states"] == {"ACTIVE": 2}, done
    assert fleet.status().restarts == 2
    for device_id in fleet.device_ids:
        events = [e for e in _events(cloud, device_id) if e["version"] == version]
        queued = [i for i, e in enumerate(events) if e["state"] == "QUEUED"]
        assert len(queued) == 2, events
        resumed = [e for e in events[queued[1] :] if e["state"] == "DOWNLOADING"]
        assert resumed[0]["bytes_done"] > 0, events


def test_a_slow_device_takes_its_delay_over_every_chunk(
    cloud: Cloud, fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """One of two devices waits 0.3 s over each chunk it receives: its download (8 chunks)
    lasts at least 8 times 0.3 s; both activate."""
    fleet = _fleet(cloud, fleets, tmp_path / "sim", 2, slow_share=0.5, slow_delay_s=0.3)
    slow = [d for d, f in fleet.faults_of.items() if f["chunk_delay_s"]]
    assert len(slow) == 1
    version = cloud.register(MODEL, _big_model(8))
    chunks = -(-_size(cloud, version) // cloud.context.settings.chunk_size)
    done = _roll_out(cloud, version, canary=2)
    assert done["states"] == {"ACTIVE": 2}, done
    events = [e for e in _events(cloud, slow[0]) if e["version"] == version]
    began = next(e["at"] for e in events if e["state"] == "DOWNLOADING")
    verified = next(e["at"] for e in events if e["state"] == "VERIFYING")
    took = (datetime.fromisoformat(verified) - datetime.fromisoformat(began)).total_seconds()
    assert took >= chunks * 0.3 * 0.9


def test_a_version_that_fails_its_health_check_stops_at_the_canary(
    cloud: Cloud, fleets: list[SimulatedFleet], tmp_path: Path
) -> None:
    """The fleet runs v1; a broken copy of it (new bytes, golden outputs off by one) is rolled
    out with a canary of one: the canary's real health check fails, the rollout aborts, no
    device ever reports it ACTIVE and every device serves v1."""
    fleet = _fleet(cloud, fleets, tmp_path / "sim", 3)
    v1 = cloud.register(MODEL, _big_model(9))
    assert _roll_out(cloud, v1, canary=3)["states"] == {"ACTIVE": 3}
    with cloud.admin() as client:
        broken = int(register_broken(client, MODEL)["version"])
    done = _roll_out(cloud, broken, canary=1)
    assert done["state"] == "ABORTED", done
    assert done["states"] == {"REVERTED": 1, "SKIPPED": 2}
    for device_id in fleet.device_ids:
        events = _events(cloud, device_id)
        assert not [e for e in events if e["version"] == broken and e["state"] == "ACTIVE"]
    failed = [
        e for d in fleet.device_ids for e in _events(cloud, d)
        if e["version"] == broken and e["state"] == "FAILED"
    ]  # fmt: skip
    assert len(failed) == 1
    assert "differs by" in failed[0]["reason"]
    wait_for(lambda: fleet.status().serving(MODEL, v1) == 3, 30, "every device on v1")


def test_the_simulate_command_leaves_no_device_folder_behind_unless_kept(
    cloud: Cloud, tmp_path: Path
) -> None:
    """`edgefleet simulate --keep` leaves its devices' folders (their tokens, and the models
    they would hold) in place; a run that ends normally without it removes them, and
    `--clean` first removes what an earlier run left (say, one killed with SIGKILL): the
    devices it still knows get new tokens. Before, nothing was ever removed (in /dev/shm by
    default: memory) and there was no flag for it."""
    root = tmp_path / "sim"

    def simulate(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                EDGEFLEET, "simulate", "--agents", "2", "--processes", "1", "--prefix", "simc",
                "--api", cloud.url, "--token", ADMIN_TOKEN, "--data-dir", str(root),
                "--duration", "1", *flags,
            ],
            capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip

    kept = simulate("--keep")
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert (root / "devices" / "simc-0001" / "agent.json").is_file()
    leftover = root / "devices" / "simc-0009" / "agent.json"
    leftover.parent.mkdir()
    leftover.write_text("{}")
    again = simulate("--clean")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 devices (0 enrolled now)" in again.stdout
    assert sorted(p.name for p in root.iterdir()) == []
