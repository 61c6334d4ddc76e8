"""A simulated fleet against a running cloud: N devices enrolled over the REST API, run by
`edge-agent simulate` worker processes (many real agents each: edge_agent/simulator/).

The cloud never imports the agent: it enrolls the devices, writes each one's agent.json as
`edge-agent enroll` would, writes one plan per worker, starts the workers as processes and
reads the status file each keeps."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cloud.demo.agents import agent_command
from cloud.embedded.processes import ChildProcess, describe_exit, run_all
from shared.errors import EdgeFleetError, InvalidInput, ServiceUnavailable
from shared.fsutil import atomic_write

__all__ = ["AGENTS_PER_WORKER", "Faults", "FleetStatus", "SimulatedFleet", "answer"]

_LOGGER = logging.getLogger(__name__)
AGENTS_PER_WORKER = 100
_BULK = 1000  # devices per bulk enrollment (the route's limit)
_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Faults:
    """What goes wrong, fleet-wide: ``chunk_loss`` of the chunks every device receives is
    lost; ``restart_share`` of the devices restart once mid-download; ``slow_share`` of them
    take ``slow_delay_s`` over each chunk. Which devices: drawn with ``seed``."""

    chunk_loss: float = 0.0
    restart_share: float = 0.0
    slow_share: float = 0.0
    slow_delay_s: float = 0.05
    seed: int = 0

    def check(self) -> None:
        if not 0 <= self.chunk_loss < 1:
            raise InvalidInput("chunk loss must be at least 0 and less than 1")
        for name in ("restart_share", "slow_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidInput(f"{name.replace('_', ' ')} must be between 0 and 1")
        if not 0 <= self.slow_delay_s <= 10:
            raise InvalidInput("the slow devices' delay per chunk must be 0 to 10 s")


@dataclass
class FleetStatus:
    """The workers' reports, added up."""

    agents: int = 0
    started: bool = False
    connected: int = 0
    deploying: int = 0
    active: Counter[str] = field(default_factory=Counter)
    threads: int = 0
    rss_bytes: int = 0
    agent_threads: int = 0  # threads the agents added (over each worker's own before them)
    agent_rss_bytes: int = 0
    restarts: int = 0
    chunks_seen: int = 0
    chunks_dropped: int = 0
    workers: int = 0
    reporting: int = 0

    @property
    def threads_per_agent(self) -> float:
        return self.agent_threads / self.agents if self.agents else 0.0

    @property
    def mib_per_agent(self) -> float:
        """Whole processes' memory over the agents: what 1,000 devices cost here."""
        return self.rss_bytes / 2**20 / self.agents if self.agents else 0.0

    def serving(self, model: str, version: int) -> int:
        return self.active.get(f"{model}:{version}", 0)


@dataclass
class _Worker:
    index: int
    plan_file: Path
    status_file: Path
    child: ChildProcess


class SimulatedFleet:
    def __init__(
        self,
        *,
        api_url: str,
        admin_token: str,
        root: Path,
        agents: int,
        prefix: str = "sim",
        labels: dict[str, str] | None = None,
        processes: int | None = None,
        faults: Faults | None = None,
        agent_settings: dict[str, Any] | None = None,
        say: Callable[[str], None] = _LOGGER.info,
    ) -> None:
        """``agent_settings`` go into every agent.json (e.g. ``telemetry_interval_s``)."""
        if agents < 1:
            raise InvalidInput("a simulated fleet needs at least one agent")
        self.faults = faults or Faults()
        self.faults.check()
        self.api_url = api_url.rstrip("/")
        self.root = root
        self.count = agents
        self.prefix = prefix
        self.labels = {"simulated": prefix} | (labels or {})
        self.processes = max(1, min(agents, processes or math.ceil(agents / AGENTS_PER_WORKER)))
        self.agent_settings = {"telemetry_interval_s": 10.0} | (agent_settings or {})
        self.say = say
        self.device_ids = [f"{prefix}-{i:04d}" for i in range(1, agents + 1)]
        self._admin = httpx.Client(
            base_url=self.api_url,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=httpx.Timeout(120, connect=5),
        )
        self.workers: list[_Worker] = []
        # Each device's faults, once started (chunk_loss, chunk_delay_s, restart_mid_download).
        self.faults_of: dict[str, dict[str, Any]] = {}

    def home(self, device_id: str) -> Path:
        return self.root / "devices" / device_id

    # -- enrollment ------------------------------------------------------------------------

    def enroll(self) -> int:
        """Enroll the devices the registry does not know (bulk), and give those it knows but
        whose agent.json is gone a new token; returns how many were enrolled now."""
        known = self._enrolled()
        new = [d for d in self.device_ids if d not in known]
        for start in range(0, len(new), _BULK):
            batch = new[start : start + _BULK]
            body = {"devices": [{"device_id": d, "labels": self.labels} for d in batch]}
            enrolled = answer(self._admin.post("/v1/devices/bulk", json=body))
            for item in enrolled["devices"]:
                self._write_config(item["device"]["id"], item["token"], enrolled)
        for device_id in sorted(known & set(self.device_ids)):
            if not (self.home(device_id) / "agent.json").is_file():
                rotated = answer(self._admin.post(f"/v1/devices/{device_id}/token"))
                self._write_config(device_id, rotated["token"], rotated)
        return len(new)

    def _enrolled(self) -> set[str]:
        selector = [f"simulated={self.prefix}"]
        devices = answer(self._admin.get("/v1/devices", params={"label": selector}))
        return {str(d["id"]) for d in devices}

    def _write_config(self, device_id: str, token: str, enrolled: dict[str, Any]) -> None:
        """The agent.json `edge-agent enroll` would write (token included, so 0600)."""
        home = self.home(device_id)
        config = {
            "device_id": device_id,
            "token": token,
            "cloud_url": self.api_url,
            "mqtt_url": enrolled["mqtt_url"],
            "public_key": enrolled["public_key"],
            "data_dir": str(home.resolve()),
            **self.agent_settings,
        }
        home.mkdir(parents=True, exist_ok=True)
        atomic_write(home / "agent.json", json.dumps(config, indent=2).encode(), mode=0o600)

    # -- workers ---------------------------------------------------------------------------

    def _plans(self) -> list[list[dict[str, Any]]]:
        rng = random.Random(self.faults.seed)  # noqa: S311 - which devices get faults
        restart = set(rng.sample(self.device_ids, round(self.faults.restart_share * self.count)))
        slow = set(rng.sample(self.device_ids, round(self.faults.slow_share * self.count)))
        plans: list[list[dict[str, Any]]] = [[] for _ in range(self.processes)]
        for number, device_id in enumerate(self.device_ids):
            faults = {
                "chunk_loss": self.faults.chunk_loss,
                "chunk_delay_s": self.faults.slow_delay_s if device_id in slow else 0.0,
                "restart_mid_download": device_id in restart,
            }
            plans[number % self.processes].append(
                {"home": str(self.home(device_id).resolve()), "faults": faults}
            )
            self.faults_of[device_id] = faults
        return plans

    def start(self) -> None:
        """Start the worker processes (return at once; see :meth:`wait_started`)."""
        command = agent_command()
        if command is None:
            raise ServiceUnavailable(
                "`edge-agent` is not installed beside this Python (pip install -e '.[edge]')"
            )
        run_dir = self.root / "workers"
        run_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        env["PYTHONUNBUFFERED"] = "1"
        for index, agents in enumerate(self._plans()):
            plan_file = run_dir / f"worker-{index}.plan.json"
            status_file = run_dir / f"worker-{index}.status.json"
            status_file.unlink(missing_ok=True)
            plan = {"agents": agents, "status_file": str(status_file.resolve()), "seed": index}
            atomic_write(plan_file, json.dumps(plan).encode(), mode=0o600)
            argv = [*command, "--log-level", "WARNING", "simulate", "--plan", str(plan_file)]
            child = ChildProcess(argv, log_path=run_dir / f"worker-{index}.log", env=env)
            child.spawn()
            self.workers.append(_Worker(index, plan_file, status_file, child))

    def status(self) -> FleetStatus:
        total = FleetStatus(workers=len(self.workers))
        started = True
        for worker in self.workers:
            code = worker.child.exit_code()
            if code is not None:
                raise ServiceUnavailable(
                    f"simulator worker {worker.index} exited ({describe_exit(code)}); see "
                    f"{worker.child.log_path}"
                )
            try:
                report = json.loads(worker.status_file.read_bytes())
            except (OSError, ValueError):
                started = False
                continue
            total.reporting += 1
            started = started and bool(report["started"])
            for name in ("agents", "connected", "deploying", "threads", "rss_bytes"):
                setattr(total, name, getattr(total, name) + int(report[name]))
            for name in ("restarts", "chunks_seen", "chunks_dropped"):
                setattr(total, name, getattr(total, name) + int(report[name]))
            total.agent_threads += int(report["threads"]) - int(report["baseline_threads"])
            total.agent_rss_bytes += int(report["rss_bytes"]) - int(report["baseline_rss_bytes"])
            total.active.update(report["active"])
        total.started = started and total.reporting == len(self.workers)
        return total

    def wait_started(self, timeout: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Until every agent runs and is connected to the broker."""
        deadline = time.monotonic() + timeout
        while not stop():
            status = self.status()
            if status.started and status.connected == self.count:
                return
            if time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"simulated fleet not up within {timeout:g}s: {status.connected} of "
                    f"{self.count} agents connected"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to every worker at once (each stops its agents cleanly), then wait."""
        for worker in self.workers:
            worker.child.terminate()
        run_all(
            [
                *((f"stopping simulator worker {w.index}", _stopper(w)) for w in self.workers),
                ("closing the API client", self._admin.close),
            ]
        )
        self.workers = []


def _stopper(worker: _Worker) -> Callable[[], None]:
    return lambda: worker.child.stop(_STOP_TIMEOUT_S)


def answer(response: httpx.Response) -> Any:
    """The JSON of a successful answer; else an error naming the call and what it said."""
    if response.is_success:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    request = response.request
    raise EdgeFleetError(
        f"{request.method} {request.url.path} answered {response.status_code}: {message}"
    )
