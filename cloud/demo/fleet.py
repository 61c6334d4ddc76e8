"""The demo's simulated fleet: N devices run as real agents by `edge-agent simulate` workers
(cloud/simulate/), and the INT8 model rolled out to them in waves through the rollout engine,
each wave's progress said as it goes. Its devices are the demo's own: those of an earlier run
are deleted first, so every run starts from devices that run nothing."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from cloud.simulate.fleet import SimulatedFleet, answer
from shared.errors import EdgeFleetError

__all__ = ["PREFIX", "DemoFleet"]

PREFIX = "demo-sim"
_START_TIMEOUT_S = 120.0
_ROLLOUT_TIMEOUT_S = 300.0
_POLL_S = 0.5


class DemoFleet:
    def __init__(
        self,
        count: int,
        *,
        say: Callable[[str], None],
        strategy: dict[str, Any] | None = None,
    ) -> None:
        self.count = count
        self.say = say
        self.strategy = strategy or {"canary": 2, "growth": 2, "device_timeout_s": 120}
        self.fleet: SimulatedFleet | None = None
        self._warned = False

    def run(
        self, api_url: str, admin_token: str, data_dir: Path, model: str, stop: threading.Event
    ) -> None:
        """Start the fleet and roll the newest INT8 version of ``model`` out to it. Whatever
        goes wrong is said as a warning: the rest of the demo goes on without it."""
        try:
            with _client(api_url, admin_token) as client:
                self._forget_earlier(client, data_dir)
                version = _newest_int8(client, model)
                if version is None:
                    self.say(f"  {model} has no INT8 version: no rollout to the simulated fleet")
                    return
                self._start(api_url, admin_token, data_dir, stop)
                if not stop.is_set():
                    self._roll_out(client, model, version, stop)
        except (EdgeFleetError, httpx.HTTPError, OSError) as exc:
            message = exc.message if isinstance(exc, EdgeFleetError) else str(exc)
            self.say(f"warning: the simulated fleet stopped short: {message}")

    def _forget_earlier(self, client: httpx.Client, data_dir: Path) -> None:
        earlier = answer(client.get("/v1/devices", params={"label": [f"simulated={PREFIX}"]}))
        if earlier:
            self.say(f"Deleting the {len(earlier)} simulated devices of an earlier run")
        for device in earlier:
            _done(client.delete(f"/v1/devices/{device['id']}"))
        shutil.rmtree(data_dir, ignore_errors=True)

    def _start(self, api_url: str, admin_token: str, data_dir: Path, stop: threading.Event) -> None:
        self.fleet = SimulatedFleet(
            api_url=api_url, admin_token=admin_token, root=data_dir, agents=self.count,
            prefix=PREFIX, processes=1, agent_settings={"telemetry_interval_s": 5.0},
        )  # fmt: skip
        self.say(
            f"Simulated fleet: {self.count} devices ({PREFIX}-0001…), real agents in one "
            f"`edge-agent simulate` process; logs in {data_dir / 'workers'}"
        )
        self.fleet.enroll()
        self.fleet.start()
        self.fleet.wait_started(_START_TIMEOUT_S, stop.is_set)

    def _roll_out(
        self, client: httpx.Client, model: str, version: int, stop: threading.Event
    ) -> None:
        body = {"model": model, "version": version, "selector": {"simulated": PREFIX},
                "strategy": self.strategy}  # fmt: skip
        rollout = answer(client.post("/v1/rollouts", json=body))
        sizes = ", ".join(str(w["devices"]) for w in rollout["progress"])
        self.say(
            f"Rolling {model}:{version} (INT8) out to them: rollout {rollout['id']}, waves of "
            f"{sizes} (GET /v1/rollouts/{rollout['id']})"
        )
        said: dict[int, str] = {}
        deadline = time.monotonic() + _ROLLOUT_TIMEOUT_S
        while not stop.is_set():
            row = answer(client.get(f"/v1/rollouts/{rollout['id']}"))
            for wave in row["progress"]:
                line = ", ".join(f"{n} {s}" for s, n in sorted(wave["states"].items()))
                if said.get(wave["wave"]) != line and set(wave["states"]) != {"PENDING"}:
                    said[wave["wave"]] = line
                    self.say(f"  wave {wave['wave']} ({wave['devices']} devices): {line}")
            if row["state"] not in ("IN_PROGRESS", "PAUSED", "ABORTING"):
                reason = f" ({row['reason']})" if row["reason"] else ""
                self.say(f"  rollout {rollout['id']} {row['state']}{reason}")
                return
            if time.monotonic() > deadline:
                self.say(f"  rollout {rollout['id']} still {row['state']}: see its progress")
                return
            stop.wait(_POLL_S)

    def tick(self) -> None:
        """A worker that died is a warning (once), not the end of the demo."""
        if self.fleet is None or self._warned:
            return
        try:
            self.fleet.status()
        except EdgeFleetError as exc:
            self._warned = True
            self.say(f"warning: {exc.message}. The rest of the demo goes on.")

    def stop(self) -> None:
        if self.fleet is not None:
            self.say(f"Stopping {self.count} simulated device(s)")
            self.fleet.stop()
            self.fleet = None


def _client(api_url: str, admin_token: str) -> httpx.Client:
    return httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60
    )


def _newest_int8(client: httpx.Client, model: str) -> int | None:
    versions = answer(client.get(f"/v1/models/{model}/versions"))
    int8 = [int(v["version"]) for v in versions if v["precision"] == "int8"]
    return max(int8) if int8 else None


def _done(response: httpx.Response) -> None:
    """A 204 (or any success) with no body; an error otherwise."""
    if not response.is_success:
        answer(response)
