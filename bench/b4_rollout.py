"""B4 — rollout at fleet scale: simulated agents through a real Mosquitto and the real cloud.

    python -m bench b4_rollout [--quick] [--agents=100,500,1000] [--only=together,waves,...]

For each fleet size N: a throwaway cloud (bench/fleet_cloud.py: Mosquitto with the shipped
queue limits, PostgreSQL, Redis, one cloud process), N devices enrolled in bulk and run by
`edgefleet simulate`'s workers (real agents, ~100 per process, data under /dev/shm), ~2 MB
models registered over REST, and rollouts through the real engine (`POST /v1/rollouts`):

- together: one wave of all N (every device starts at once): time from the rollout's
  creation to all ACTIVE (server timestamps), chunk bytes the cloud published ÷ artifact size;
- waves: canary 1 %, then waves growing 4 times: the same two numbers;
- loss: together, every device losing 5 % of the chunks it receives;
- restarts: together, 10 % of the devices stopped mid-download and started again on their
  data dir;
- broken: a version whose golden outputs are wrong, canary 1 %: devices that ever reported
  ACTIVE on it (past the canary, and in it) and the time from the abort to the rollout ABORTED,
  every canary confirmed back on the old version.

``--quick`` runs N = 100 only and writes b4_rollout_quick.json (never the full results).
``--only=`` runs those rollouts (together, waves, broken, loss, restarts) only. The cloud's
log is kept as results/b4_rollout_cloud_nN.log (each carousel pass is a line in it).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from bench.common import RESULTS, machine, write
from bench.fleet_cloud import TOKEN, BenchCloud, big_model, broker_config, peak_rss_mib
from cloud.registry.database import Database
from cloud.registry.tables import AuditEvent, DeploymentEvent, RolloutTarget
from cloud.simulate.fleet import Faults, SimulatedFleet

MODEL = "b4-model"
TIMEOUT_S = 600.0
_POLL_S = 0.25


def _seconds(row: dict[str, Any], start: str, end: str) -> float:
    return (datetime.fromisoformat(row[end]) - datetime.fromisoformat(row[start])).total_seconds()


class Run:
    """One fleet size: its cloud, its fleet (restarted with other faults), its versions."""

    def __init__(self, cloud: BenchCloud, agents: int, root: Path) -> None:
        self.cloud = cloud
        self.agents = agents
        self.root = root
        self.prefix = f"b4n{agents}"
        self.fleet: SimulatedFleet | None = None
        self.versions: list[dict[str, Any]] = []
        self.current: int | None = None  # the version the fleet serves

    def register(self, count: int) -> None:
        for seed in range(1, count + 1):
            self.versions.append(self.cloud.register(MODEL, big_model(seed)))
        self.broken = self.cloud.register(MODEL, big_model(99), broken=True)

    def start_fleet(self, faults: Faults) -> dict[str, Any]:
        self.stop_fleet()
        fleet = SimulatedFleet(
            api_url=self.cloud.api, admin_token=TOKEN, root=self.root, agents=self.agents,
            prefix=self.prefix, faults=faults, agent_settings={"telemetry_interval_s": 10.0},
        )  # fmt: skip
        self.fleet = fleet
        started = time.monotonic()
        fleet.enroll()
        fleet.start()
        fleet.wait_started(max(120.0, self.agents / 5))
        status = fleet.status()
        return {
            "fleet_start_s": round(time.monotonic() - started, 1),
            "workers": status.workers,
            "threads_per_agent": round(status.threads_per_agent, 2),
            "mib_per_agent": round(status.mib_per_agent, 2),
            "agent_added_mib_per_agent": round(status.agent_rss_bytes / 2**20 / self.agents, 3),
        }

    def stop_fleet(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None

    def _published(self) -> float:
        return self.cloud.metric("edgefleet_chunk_bytes_published")

    def rollout(self, version: dict[str, Any], name: str, **strategy: Any) -> dict[str, Any]:
        """Start a rollout of ``version`` to the whole fleet; wait until it ends."""
        assert self.fleet is not None
        before = self._published()
        load = os.getloadavg()[0]
        selector = {"simulated": self.prefix}
        created = self.cloud.rollout(
            MODEL, version["version"], selector, device_timeout_s=300, **strategy
        )
        timeline: list[tuple[float, int]] = []
        aborting_at: float | None = None
        t0 = time.time()
        while True:
            row = self.cloud.call("GET", f"/v1/rollouts/{created['id']}")
            now = time.time()
            timeline.append((round(now - t0, 2), int(row["states"].get("ACTIVE", 0))))
            if aborting_at is None and row["state"] in ("ABORTING", "ABORTED"):
                aborting_at = now
            if row["state"] in ("COMPLETED", "ABORTED", "SUPERSEDED"):
                break
            if now - t0 > TIMEOUT_S:
                raise RuntimeError(f"{name}: rollout not over after {TIMEOUT_S:g}s: {row}")
            time.sleep(_POLL_S)
        published = self._published() - before
        status = self.fleet.status()
        result: dict[str, Any] = {
            "scenario": name,
            "agents": self.agents,
            "state": row["state"],
            "states": row["states"],
            "waves": row["waves"],
            "seconds": round(_seconds(row, "created_at", "finished_at"), 2),
            "artifact_bytes": version["size"],
            "published_bytes": int(published),
            "published_per_artifact": round(published / version["size"], 2),
            "half_active_s": _when(timeline, self.agents / 2),
            "restarts": status.restarts,
            "chunks_dropped": status.chunks_dropped,
            "load_1min_before": round(load, 2),
            "load_1min_after": round(os.getloadavg()[0], 2),
        }
        result |= self._timings(created["id"], row["created_at"])
        if row["state"] == "COMPLETED":
            self.current = version["version"]
        if aborting_at is not None:
            finished = datetime.fromisoformat(row["finished_at"]).timestamp()
            result["abort_to_back_s"] = round(finished - aborting_at, 2)
            result["reason"] = row["reason"]
            result |= self._activations(created["id"], version["version"])
            result["serving_old"] = status.serving(MODEL, self.current or 0)
        return result

    def _timings(self, rollout_id: int, created_at: str) -> dict[str, float | None]:
        """From the rollout's creation: when the engine sent its last device the version
        (how long it took to reach the devices), and when the devices said ACTIVE, by their
        own status events (the rollout's counts move only when the engine next looks)."""
        created = datetime.fromisoformat(created_at)

        def since(at: datetime | None) -> float | None:
            if at is None:
                return None
            at = at if at.tzinfo is not None else at.replace(tzinfo=created.tzinfo)
            return round((at - created).total_seconds(), 2)

        database = Database(self.cloud.database)
        try:
            with database.session() as s:
                issued = s.scalar(
                    select(func.max(AuditEvent.at)).where(
                        AuditEvent.actor == f"rollout:{rollout_id}",
                        AuditEvent.action == "device.deploy",
                    )
                )
                active = sorted(
                    s.scalars(
                        select(DeploymentEvent.at).where(
                            DeploymentEvent.rollout_id == rollout_id,
                            DeploymentEvent.state == "ACTIVE",
                        )
                    )
                )
        finally:
            database.dispose()
        return {
            "last_deploy_issued_s": since(issued),
            "devices_active_p50_s": since(active[len(active) // 2]) if active else None,
            "devices_active_last_s": since(active[-1]) if active else None,
        }

    def _activations(self, rollout_id: int, version: int) -> dict[str, int]:
        """Devices that ever reported ACTIVE on ``version``: in the canary, and past it."""
        database = Database(self.cloud.database)
        try:
            with database.session() as s:
                active = (
                    select(DeploymentEvent.device_id)
                    .where(DeploymentEvent.model == MODEL, DeploymentEvent.version == version,
                           DeploymentEvent.state == "ACTIVE")
                    .scalar_subquery()
                )  # fmt: skip
                by_wave = s.execute(
                    select(RolloutTarget.wave, func.count())
                    .where(RolloutTarget.rollout_id == rollout_id)
                    .where(RolloutTarget.device_id.in_(active))
                    .group_by(RolloutTarget.wave)
                ).all()
        finally:
            database.dispose()
        return {
            "ever_active_in_canary": sum(n for wave, n in by_wave if wave == 0),
            "ever_active_past_canary": sum(n for wave, n in by_wave if wave > 0),
        }


def _key(name: str) -> str:
    """together, waves, broken, loss or restarts: what --only= names a rollout by."""
    return "loss" if "loss" in name else "restarts" if "restarted" in name else name


def _when(timeline: list[tuple[float, int]], count: float) -> float | None:
    return next((t for t, active in timeline if active >= count), None)


def run_size(agents: int, work: Path, only: set[str] | None = None) -> list[dict[str, Any]]:
    cloud = BenchCloud(work / f"n{agents}")
    (work / f"n{agents}").mkdir(parents=True)
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(prefix="edgefleet-b4-", dir=shm if shm.is_dir() else None))
    run = Run(cloud, agents, root)
    results: list[dict[str, Any]] = []
    canary = max(1, math.ceil(agents / 100))
    try:
        cloud.start()
        run.register(5)
        plans: list[tuple[str, Faults, list[tuple[str, int, dict[str, Any]]]]] = [
            ("clean", Faults(), [
                ("together", 0, {"canary": agents}),
                ("waves", 1, {"canary": canary, "growth": 4}),
                ("broken", -1, {"canary": canary, "growth": 4}),
            ]),
            ("loss 5%", Faults(chunk_loss=0.05, seed=1), [
                ("together, 5% chunk loss", 2, {"canary": agents}),
            ]),
            ("restarts 10%", Faults(restart_share=0.1, seed=2), [
                ("together, 10% restarted mid-download", 3, {"canary": agents}),
            ]),
        ]  # fmt: skip
        if only is not None:  # --only=together,loss: those rollouts (by _key)
            plans = [(f, x, [r for r in rs if _key(r[0]) in only]) for f, x, rs in plans]
            plans = [plan for plan in plans if plan[2]]
        for fleet_name, faults, rollouts in plans:
            cost = run.start_fleet(faults)
            print(f"N={agents} fleet {fleet_name}: {cost}", flush=True)
            for name, index, strategy in rollouts:
                version = run.broken if index < 0 else run.versions[index]
                result = run.rollout(version, name, **strategy) | cost | {"fleet": fleet_name}
                result["cloud_peak_rss_mib"] = round(peak_rss_mib(cloud.cloud.pid), 1)
                result["broker_peak_rss_mib"] = round(peak_rss_mib(cloud.broker.pid), 1)
                print(json.dumps(result), flush=True)
                results.append(result)
    finally:
        run.stop_fleet()
        cloud.stop()
        shutil.rmtree(root, ignore_errors=True)
        log = work / f"n{agents}" / "cloud.log"
        if log.exists():  # the carousel's passes and the engine's rounds, for a look after
            shutil.copy(log, RESULTS / f"b4_rollout_cloud_n{agents}.log")
    return results


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    sizes = [100] if quick else [100, 500, 1000]
    only: set[str] | None = None
    for arg in argv:
        if arg.startswith("--agents="):
            sizes = [int(n) for n in arg.split("=", 1)[1].split(",")]
        if arg.startswith("--only="):
            only = set(arg.split("=", 1)[1].split(","))
    work = Path(tempfile.mkdtemp(prefix="edgefleet-b4-work-"))
    results: list[dict[str, Any]] = []
    try:
        for agents in sizes:
            results += run_size(agents, work, only)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    payload = {
        "sizes": sizes,
        "machine_load_1min_at_end": os.getloadavg()[0],
        "broker_config": broker_config(0).replace("listener 0", "listener PORT"),
        "machine_detail": machine(),
        "results": results,
    }
    for r in results:
        print(
            f"N={r['agents']:5d} {r['scenario']:40s} {r['state']:9s} {r['seconds']:7.1f}s "
            f"published {r['published_per_artifact']:5.2f}x"
        )
    print("wrote", write("b4_rollout_quick" if quick else "b4_rollout", payload))
