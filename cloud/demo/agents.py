"""Local `edge-agent run` processes for the demo: enrolled over the API, logs under the data dir."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cloud.embedded.processes import ChildProcess
from shared.errors import EdgeFleetError, ServiceUnavailable

__all__ = ["LocalAgent", "LocalAgents", "agent_command"]

_LOGGER = logging.getLogger(__name__)
_READY_TIMEOUT_S = 60.0
_STOP_TIMEOUT_S = 10.0


def agent_command() -> list[str] | None:
    """The `edge-agent` console script of this installation, if it has one."""
    beside = Path(sys.executable).with_name("edge-agent")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("edge-agent")
    return [found] if found else None


@dataclass(slots=True)
class LocalAgent:
    device_id: str
    home: Path
    log_path: Path
    child: ChildProcess
    api_url: str = ""

    @property
    def ready_file(self) -> Path:
        return self.home / "ready.json"


def _raise_for(response: httpx.Response) -> Any:
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


class LocalAgents:
    """N agents, each a device of its own: its data dir, its config file, its process."""

    def __init__(
        self, *, command: list[str], api_url: str, admin_token: str, data_dir: Path, count: int
    ) -> None:
        self.command = command
        self.api_url = api_url
        self.root = data_dir / "agents"
        self.log_dir = data_dir / "logs"
        self.agents = [self._agent(f"demo-agent-{i}") for i in range(1, count + 1)]
        self._admin = httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
        )

    def _agent(self, device_id: str) -> LocalAgent:
        home = self.root / device_id
        log_path = self.log_dir / f"{device_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        # Unbuffered, so the log file says what the agent did up to the moment it stopped.
        env |= {"PYTHONUNBUFFERED": "1", "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "5"}
        argv = [
            *self.command, "--data-dir", str(home), "run",
            "--port", "0", "--ready-file", str(home / "ready.json"),
        ]  # fmt: skip
        return LocalAgent(device_id, home, log_path, ChildProcess(argv, log_path=log_path, env=env))

    # -- start -----------------------------------------------------------------------------

    def start(
        self, stop: threading.Event, *, without_login: Collection[str] = ()
    ) -> list[LocalAgent]:
        """Enroll every agent (`edge-agent enroll`, as on a device), start them all, and
        return once each has written its ready file with its local API URL.

        A device of an earlier run named in ``without_login`` (its broker has no login for
        it: that run's broker had no authentication) is given a new token, and with it one.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        relogin = set(without_login)
        enrolling = [(a, self._enroll(a, a.device_id in relogin)) for a in self.agents]
        for agent, enroll in enrolling:
            output, _ = enroll.communicate(timeout=60)
            if enroll.returncode != 0:
                raise ServiceUnavailable(
                    f"edge-agent enroll for {agent.device_id} failed: {output.strip()}"
                )
        for agent in self.agents:
            agent.ready_file.unlink(missing_ok=True)
            agent.child.spawn()
        for agent in self.agents:
            ready_file = agent.ready_file
            agent.child.wait_until(
                lambda: stop.is_set() or ready_file.is_file(),  # noqa: B023 - called right here
                timeout=_READY_TIMEOUT_S,
                what=f"{agent.device_id} (log {agent.log_path})",
            )
            if stop.is_set():
                break
            agent.api_url = str(json.loads(ready_file.read_text())["api_url"])
        return self.agents

    def _enroll(self, agent: LocalAgent, relogin: bool) -> subprocess.Popen[str]:
        """Start `edge-agent enroll` with the device's token: a new device gets one from the
        API; a device of an earlier run keeps its own and only learns the new addresses,
        unless it needs a broker login (re-enrolled: a new token, which is that login)."""
        config = agent.home / "agent.json"
        if config.is_file() and relogin:
            path = f"/v1/devices/{agent.device_id}/token"
            token = str(_raise_for(self._admin.post(path))["token"])
        elif config.is_file():
            token = str(json.loads(config.read_text())["token"])
        else:
            enrolled = _raise_for(
                self._admin.post(
                    "/v1/devices", json={"device_id": agent.device_id, "labels": {"fleet": "demo"}}
                )
            )
            token = str(enrolled["token"])
        argv = [
            *self.command, "--data-dir", str(agent.home), "enroll",
            "--cloud", self.api_url, "--token", token,
        ]  # fmt: skip
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=agent.child.env,
            start_new_session=True,
        )

    # -- the model -------------------------------------------------------------------------

    def latest_int8(self, model: str) -> int | None:
        versions = _raise_for(self._admin.get(f"/v1/models/{model}/versions"))
        int8 = [int(v["version"]) for v in versions if v["precision"] == "int8"]
        return int8[-1] if int8 else None

    def deploy(self, model: str, version: int) -> None:
        for agent in self.agents:
            _raise_for(
                self._admin.put(
                    f"/v1/devices/{agent.device_id}/deployments/{model}", json={"version": version}
                )
            )

    def wait_active(
        self, model: str, version: int, stop: threading.Event, timeout: float
    ) -> list[LocalAgent]:
        """The agents that report ``model:version`` active within ``timeout`` seconds."""
        waiting = {a.device_id: a for a in self.agents}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline and not stop.is_set():
            for device_id in list(waiting):
                device = _raise_for(self._admin.get(f"/v1/devices/{device_id}"))
                if (device.get("reported") or {}).get("active", {}).get(model) == version:
                    del waiting[device_id]
            stop.wait(0.2)
        return [a for a in self.agents if a.device_id not in waiting]

    # -- stop ------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        return [a.child.pid for a in self.agents if a.child.pid is not None]

    def stop(self) -> None:
        """SIGTERM to every agent at once, then wait for each (SIGKILL after a while)."""
        for agent in self.agents:
            agent.child.terminate()
        for agent in self.agents:
            try:
                agent.child.stop(_STOP_TIMEOUT_S)
            except (OSError, subprocess.SubprocessError):
                _LOGGER.exception("stopping %s", agent.device_id)
        self._admin.close()
