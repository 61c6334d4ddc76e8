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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cloud.embedded.processes import ChildProcess, describe_exit, run_all
from shared.errors import EdgeFleetError, ServiceUnavailable

__all__ = ["LocalAgent", "LocalAgents", "agent_command"]

_LOGGER = logging.getLogger(__name__)
_ENROLL_TIMEOUT_S = 60.0
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
    api_url: str | None = None

    @property
    def ready_file(self) -> Path:
        return self.home / "ready.json"

    @property
    def config_file(self) -> Path:
        return self.home / "agent.json"


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


def _reap(enroll: subprocess.Popen[str]) -> None:
    if enroll.poll() is None:
        enroll.kill()
    enroll.wait()
    if enroll.stdout is not None:
        enroll.stdout.close()


class LocalAgents:
    """N agents, each a device of its own: its data dir, its config file, its process."""

    def __init__(
        self,
        *,
        command: list[str],
        api_url: str,
        admin_token: str,
        data_dir: Path,
        count: int,
        say: Callable[[str], None] = _LOGGER.info,
        enroll_timeout: float = _ENROLL_TIMEOUT_S,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        self.command = command
        self.api_url = api_url
        self.root = data_dir / "agents"
        self.log_dir = data_dir / "logs"
        self.say = say
        self.enroll_timeout = enroll_timeout
        self.extra_env = dict(extra_env or {})
        self.agents = [self._agent(f"demo-agent-{i}") for i in range(1, count + 1)]
        self._admin = httpx.Client(
            base_url=api_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30
        )
        self._seen_dead: set[str] = set()

    def _agent(self, device_id: str) -> LocalAgent:
        home = self.root / device_id
        log_path = self.log_dir / f"{device_id}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
        # Unbuffered, so the log file says what the agent did up to the moment it stopped.
        env |= {"PYTHONUNBUFFERED": "1", "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "5"}
        env |= self.extra_env  # e.g. federated learning's settings (cloud.demo.federated)
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
        return once each has written its ready file with its local API URL (or at once
        when ``stop`` is set).

        A device of an earlier run named in ``without_login`` (its broker has no login for
        it: that run's broker had no authentication) is given a new token, and with it one.
        """
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self._enroll_all(stop, set(without_login)):
            return []
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
                return []
            api_url = json.loads(ready_file.read_text()).get("api_url")
            agent.api_url = str(api_url) if api_url else None
        return self.agents

    def _enroll_all(self, stop: threading.Event, relogin: set[str]) -> bool:
        """`edge-agent enroll` for every agent, side by side; False when stopped first.
        Whatever happens, no enroll process outlives this call."""
        running: list[tuple[LocalAgent, subprocess.Popen[str]]] = []
        try:
            for agent in self.agents:
                if stop.is_set():
                    return False
                token = self._token(agent, agent.device_id in relogin)
                running.append((agent, self._enroll(agent, token)))
            return self._wait_enrolled(running, stop)
        finally:
            for _, enroll in running:
                _reap(enroll)

    def _wait_enrolled(
        self, running: list[tuple[LocalAgent, subprocess.Popen[str]]], stop: threading.Event
    ) -> bool:
        deadline = time.monotonic() + self.enroll_timeout
        waiting = list(running)
        while waiting:
            for agent, enroll in list(waiting):
                code = enroll.poll()
                if code is None:
                    continue
                waiting.remove((agent, enroll))
                if code != 0:
                    assert enroll.stdout is not None
                    said = " ".join(enroll.stdout.read().split()) or "no message"
                    raise ServiceUnavailable(
                        f"`edge-agent enroll` for {agent.device_id} failed "
                        f"({describe_exit(code)}): {said}"
                    )
            if waiting and time.monotonic() > deadline:
                names = ", ".join(agent.device_id for agent, _ in waiting)
                raise ServiceUnavailable(
                    f"`edge-agent enroll` for {names} did not finish within "
                    f"{self.enroll_timeout:g}s"
                )
            if waiting and stop.wait(0.05):
                return False
        return True

    def _enroll(self, agent: LocalAgent, token: str) -> subprocess.Popen[str]:
        """Start `edge-agent enroll`, the token on its standard input: not in its argv
        or environment, where others on the machine could read it."""
        argv = [
            *self.command, "--log-level", "WARNING", "--data-dir", str(agent.home), "enroll",
            "--cloud", self.api_url, "--token-file", "-",
        ]  # fmt: skip
        enroll = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=agent.child.env,
            start_new_session=True,
        )
        assert enroll.stdin is not None
        try:
            enroll.stdin.write(token + "\n")
            enroll.stdin.close()
        except OSError:
            pass  # it exited already: its status and output say why
        return enroll

    # -- tokens ----------------------------------------------------------------------------

    def _token(self, agent: LocalAgent, relogin: bool) -> str:
        """The token to enroll with. A device of an earlier run keeps its own, unless it
        needs a broker login or the registry and its folder no longer agree: then it gets a
        new one (or, gone from the registry, is enrolled again), and the demo says so."""
        saved = self._saved_token(agent)
        if saved is None:
            return self._create(agent)
        if relogin:
            return self._rotate(agent)
        answer = httpx.get(
            f"{self.api_url}/v1/device", headers={"Authorization": f"Bearer {saved}"}, timeout=30
        )
        if answer.status_code != 401:
            _raise_for(answer)
            return saved
        known = self._admin.get(f"/v1/devices/{agent.device_id}")
        if known.status_code == 404:
            self.say(
                f"  {agent.device_id} is not in the registry any more (was it reset?): "
                "enrolled again as a new device, its old models cleared"
            )
            shutil.rmtree(agent.home)
            return self._create(agent)
        _raise_for(known)
        self.say(f"  {agent.device_id}: the registry refuses its saved token: a new token")
        return self._rotate(agent)

    def _saved_token(self, agent: LocalAgent) -> str | None:
        config = agent.config_file
        if not config.exists():
            return None
        try:
            token = json.loads(config.read_text())["token"]
            if not isinstance(token, str) or not token:
                raise TypeError("no token")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.say(f"  {agent.device_id}: {config} is unreadable ({exc}): enrolling it again")
            return None
        return token

    def _create(self, agent: LocalAgent) -> str:
        answer = self._admin.post(
            "/v1/devices", json={"device_id": agent.device_id, "labels": {"fleet": "demo"}}
        )
        if answer.status_code == 409:
            self.say(f"  {agent.device_id} is enrolled, but its agent.json is gone: a new token")
            return self._rotate(agent)
        return str(_raise_for(answer)["token"])

    def _rotate(self, agent: LocalAgent) -> str:
        return str(_raise_for(self._admin.post(f"/v1/devices/{agent.device_id}/token"))["token"])

    # -- the model -------------------------------------------------------------------------

    def latest_int8(self, model: str) -> int | None:
        versions = _raise_for(self._admin.get(f"/v1/models/{model}/versions"))
        int8 = [int(v["version"]) for v in versions if v["precision"] == "int8"]
        return int8[-1] if int8 else None

    def deploy(self, model: str, version: int) -> dict[str, int]:
        """Each agent's new desired rev carrying ``model:version``."""
        revs = {}
        for agent in self.agents:
            accepted = _raise_for(
                self._admin.put(
                    f"/v1/devices/{agent.device_id}/deployments/{model}", json={"version": version}
                )
            )
            revs[agent.device_id] = int(accepted["rev"])
        return revs

    def wait_active(
        self, model: str, version: int, revs: dict[str, int], stop: threading.Event, timeout: float
    ) -> list[LocalAgent]:
        """The agents that report, within ``timeout`` seconds, ``model:version`` active
        with their rev in ``revs`` applied: a report sent since that rev was signed, not
        what the registry kept from an earlier run."""
        waiting = {a.device_id: a for a in self.agents}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline and not stop.is_set():
            for device_id in list(waiting):
                reported = _raise_for(self._admin.get(f"/v1/devices/{device_id}"))["reported"]
                reported = reported or {}
                fresh = int(reported.get("rev_applied", 0)) >= revs[device_id]
                if fresh and reported.get("active", {}).get(model) == version:
                    del waiting[device_id]
            stop.wait(0.2)
        return [a for a in self.agents if a.device_id not in waiting]

    # -- watch and stop --------------------------------------------------------------------

    def newly_dead(self) -> list[tuple[LocalAgent, int]]:
        """Agents that exited since the last call, with their exit status."""
        dead = []
        for agent in self.agents:
            code = agent.child.exit_code()
            if code is not None and agent.device_id not in self._seen_dead:
                self._seen_dead.add(agent.device_id)
                dead.append((agent, code))
        return dead

    def pids(self) -> list[int]:
        return [a.child.pid for a in self.agents if a.child.pid is not None]

    def stop(self) -> None:
        """SIGTERM to every agent at once, then wait for each (SIGKILL after a while)."""
        for agent in self.agents:
            agent.child.terminate()
        run_all(
            [
                *((f"stopping {a.device_id}", self._stopper(a)) for a in self.agents),
                ("closing the API client", self._admin.close),
            ]
        )

    @staticmethod
    def _stopper(agent: LocalAgent) -> Callable[[], None]:
        return lambda: agent.child.stop(_STOP_TIMEOUT_S)
