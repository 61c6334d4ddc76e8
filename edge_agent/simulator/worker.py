"""A simulator worker: many real agents in one process, as `edge-agent simulate --plan FILE`.

Each simulated device is the agent itself (edge_agent.agent.Agent: its MQTT link, delivery,
verification, health check, activation, presence, status and telemetry), enrolled like a
device (its own agent.json and data dir), with what a process of many devices can share made
shared: the onnxruntime sessions (sessions.py), one thread for every device's telemetry
windows instead of one each, and no local HTTP API. Faults (faults.py) act on the delivery.

The worker writes what it sees (devices connected, models active, threads, memory) to its
plan's status file every ``status_interval_s``; SIGTERM (or its parent's death) stops every
agent cleanly, each saying ``stopped`` on its presence topic."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.agent import Agent
from edge_agent.config import load_settings
from edge_agent.simulator.faults import AgentFaults, FaultCounters, delivery_with
from edge_agent.simulator.sessions import SessionCache, SharedRuntime
from edge_agent.telemetry import rss_bytes
from shared.fsutil import atomic_write

__all__ = ["Plan", "PlannedAgent", "Worker", "run_plan"]

_LOGGER = logging.getLogger(__name__)
_STOPPERS = 16  # agents stopped side by side (each waits for its `stopped` to be acked)


class PlannedAgent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    home: Path = Field(description="the device's folder, holding its agent.json")
    faults: AgentFaults = Field(default_factory=AgentFaults)


class Plan(BaseModel):
    """What one worker runs (written by `edgefleet simulate`, cloud/simulate/)."""

    model_config = ConfigDict(extra="forbid")

    agents: list[PlannedAgent] = Field(min_length=1)
    status_file: Path
    status_interval_s: float = Field(default=1.0, gt=0)
    seed: int = 0

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls.model_validate_json(path.read_bytes())


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sessions = SessionCache()
        self.counters = FaultCounters()
        self.agents: dict[str, Agent] = {}
        self.restarts = 0
        self._planned: dict[str, PlannedAgent] = {}
        self._lock = threading.Lock()
        self._restart_queue: queue.Queue[str | None] = queue.Queue()
        self._rng = random.Random(plan.seed)  # noqa: S311 - seeds for simulated faults
        self._baseline = (rss_bytes(), threading.active_count())
        self._started = False
        self._restarter_thread: threading.Thread | None = None

    # -- agents ----------------------------------------------------------------------------

    def _agent(self, planned: PlannedAgent, faults: AgentFaults) -> Agent:
        settings = load_settings(planned.home / "agent.json")
        delivery = delivery_with(
            faults, self.counters, seed=self._rng.getrandbits(32), on_restart=self._restart_due
        )
        return Agent(
            settings,
            runtime=SharedRuntime(self.sessions, threads=settings.threads),
            mqtt_delivery=delivery,
        )

    def start(self) -> None:
        for planned in self.plan.agents:
            agent = self._agent(planned, planned.faults)
            self._planned[agent.device_id] = planned
            agent.start(serve_api=False, telemetry_thread=False)
            with self._lock:
                self.agents[agent.device_id] = agent
        self._started = True
        _LOGGER.info("%d simulated agents started", len(self.agents))

    def _restart_due(self, device_id: str) -> None:
        self._restart_queue.put(device_id)

    def _restarter(self) -> None:
        """Stop an agent mid-download and start a fresh one on the same data dir (its
        partial download on disk), as a device that lost power would come back."""
        while (device_id := self._restart_queue.get()) is not None:
            try:
                with self._lock:
                    old = self.agents[device_id]
                old.stop()
                planned = self._planned[device_id]
                fresh = self._agent(
                    planned, planned.faults.model_copy(update={"restart_mid_download": False})
                )
                fresh.start(serve_api=False, telemetry_thread=False)
                with self._lock:
                    self.agents[device_id] = fresh
                    self.restarts += 1
            except Exception:
                _LOGGER.exception("restarting %s failed", device_id)

    def _telemetry(self, stop: threading.Event) -> None:
        """Every agent's telemetry window, closed and sent at its own interval (spread)."""
        due: dict[str, float] = {}
        while not stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                agents = list(self.agents.values())
            for agent in agents:
                interval = agent.settings.telemetry_interval_s
                next_at = due.setdefault(agent.device_id, now + self._rng.uniform(0, interval))
                if now < next_at:
                    continue
                due[agent.device_id] = now + interval
                try:
                    agent.close_telemetry_window()
                    agent.send_telemetry()
                except Exception:
                    _LOGGER.exception("telemetry of %s failed this round", agent.device_id)

    def stop(self) -> None:
        # No restart may start an agent once the others are being stopped.
        self._restart_queue.put(None)
        if self._restarter_thread is not None:
            self._restarter_thread.join(30)
        with self._lock:
            agents = list(self.agents.values())
        with concurrent.futures.ThreadPoolExecutor(_STOPPERS) as pool:
            for agent, done in zip(agents, pool.map(_stop_agent, agents), strict=True):
                if not done:
                    _LOGGER.warning("%s did not stop cleanly", agent.device_id)

    # -- report ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            agents = list(self.agents.values())
            restarts = self.restarts
        active: Counter[str] = Counter()
        for agent in agents:
            for name, model in agent.runtime.models().items():
                active[f"{name}:{model.version}"] += 1
        rss, threads = rss_bytes(), threading.active_count()
        return {
            "pid": os.getpid(),
            "agents": len(agents),
            "started": self._started,
            "connected": sum(a.link.connected for a in agents),
            "deploying": sum(not a.deployer.idle() for a in agents),
            "active": dict(active),
            "threads": threads,
            "rss_bytes": rss,
            "baseline_threads": self._baseline[1],
            "baseline_rss_bytes": self._baseline[0],
            "sessions": len(self.sessions),
            "restarts": restarts,
            "chunks_seen": self.counters.chunks_seen,
            "chunks_dropped": self.counters.chunks_dropped,
            "at": time.time(),
        }

    def write_status(self, **extra: Any) -> None:
        body = json.dumps(self.status() | extra).encode()
        atomic_write(self.plan.status_file, body)

    def run(self, stop: threading.Event) -> None:
        """Start every agent, report until ``stop``, then stop every agent."""
        telemetry = threading.Thread(
            target=self._telemetry, args=(stop,), name="sim-telemetry", daemon=True
        )
        restarter = threading.Thread(target=self._restarter, name="sim-restarts", daemon=True)
        self._restarter_thread = restarter
        restarter.start()
        parent = os.getppid()
        try:
            self.write_status()
            self.start()
            telemetry.start()
            while not stop.is_set():
                self.write_status()
                if os.getppid() != parent:
                    _LOGGER.warning("the simulator that started us is gone: stopping")
                    break
                stop.wait(self.plan.status_interval_s)
        finally:
            stop.set()
            self.stop()
            self.write_status(stopped=True)


def _stop_agent(agent: Agent) -> bool:
    try:
        agent.stop()
    except Exception:
        _LOGGER.exception("stopping %s failed", agent.device_id)
        return False
    return True


def run_plan(plan_file: Path, stop_signals: int) -> int:
    """`edge-agent simulate --plan FILE`: run it until a byte arrives on ``stop_signals``
    (the CLI's signal pipe: SIGTERM, SIGINT)."""
    try:
        plan = Plan.read(plan_file)
    except (OSError, ValueError) as exc:
        print(f"cannot use the plan {plan_file}: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def wait_for_a_signal() -> None:
        os.read(stop_signals, 1)
        stop.set()

    threading.Thread(target=wait_for_a_signal, name="signals", daemon=True).start()
    Worker(plan).run(stop)
    return 0
