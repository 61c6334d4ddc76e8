"""`edgefleet demo` as a user runs it: it says what it does, its agents are `edge-agent`
processes that serve the INT8 model, and Ctrl-C (or a hard kill) leaves no process behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from cloud.settings import DEV_ADMIN_TOKEN, CloudSettings
from tests.conftest import seed_reference_cache

EDGEFLEET = shutil.which("edgefleet") or str(Path(sys.executable).parent / "edgefleet")
READY_LINE = "Ctrl-C stops everything."
# What the default output must not show: INFO chatter of third-party libraries.
THIRD_PARTY_INFO = re.compile(r"INFO (httpx|alembic|onnxruntime|root|uvicorn)\b")


@dataclass
class Demo:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def api_url(self) -> str:
        match = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", self.text)
        assert match, self.text
        return match.group(1)

    def broker_port(self) -> int:
        match = re.search(r"MQTT\s+mqtt://127\.0\.0\.1:(\d+)", self.text)
        assert match, self.text
        return int(match.group(1))

    def device(self, device_id: str) -> dict[str, Any]:
        """The device as the demo's API shows it (dev mode: the built-in admin token)."""
        answer = httpx.get(
            f"{self.api_url()}/v1/devices/{device_id}",
            headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def seen_since(self, device_id: str, since: datetime, timeout: float = 20) -> None:
        """Wait until the cloud heard from ``device_id`` over MQTT after ``since``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = self.device(device_id)["last_seen_at"]
            at = datetime.fromisoformat(seen) if seen is not None else None
            # SQLite gives the stored UTC time back without its zone.
            if at is not None and (at if at.tzinfo else at.replace(tzinfo=UTC)) > since:
                return
            time.sleep(0.1)
        pytest.fail(f"the cloud never heard from {device_id} after {since}:\n{self.text}")

    def interrupt(self, timeout: float = 45) -> None:
        """Ctrl-C as a terminal sends it (SIGINT to the group); wait for the demo to end."""
        os.killpg(self.proc.pid, signal.SIGINT)
        self.rest(timeout=timeout)

    def agent_urls(self) -> dict[str, str]:
        found = re.findall(r"(demo-agent-\d+)\s+local API (http://127\.0\.0\.1:\d+)", self.text)
        return dict(found)

    def tree(self) -> list[psutil.Process]:
        return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(True)]

    def wait_for(self, marker: str, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            if marker in line:
                return
        self.proc.kill()
        pytest.fail(f"the demo never printed {marker!r}:\n{self.text}")

    def rest(self, timeout: float) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines.append(out)
        return out


def start_demo(
    tmp_path: Path,
    reference: dict[str, bytes],
    *extra: str,
    env: dict[str, str] | None = None,
) -> Demo:
    """`edgefleet demo` on ``tmp_path/demo`` as a terminal runs it, with ``env`` added."""
    data_dir = tmp_path / "demo"
    # Prebuilt reference models: the demo still registers and quantizes them, only faster.
    seed_reference_cache(CloudSettings(data_dir=data_dir, dev_mode=True), reference)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen(
        [EDGEFLEET, "demo", "--port", "0", "--data-dir", str(data_dir), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean | (env or {}) | {"COLUMNS": "200"},
        # Its own process group, as a terminal gives a foreground job.
        start_new_session=True,
    )
    return Demo(proc)


def stop_demo(demo: Demo) -> None:
    if demo.proc.poll() is None:
        os.killpg(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(10)


def test_ctrl_c_on_the_process_group_is_clean(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A terminal's Ctrl-C signals the whole foreground group. The demo is up with two agent
    processes serving the INT8 model; SIGINT to the group: exit 0, no traceback, no process
    of its tree left. Until now Redis died first and the cloud's handlers failed."""
    demo = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "2")
    try:
        demo.wait_for(READY_LINE)
        assert httpx.get(f"{demo.api_url()}/readyz", timeout=10).status_code == 200
        agents = demo.agent_urls()
        assert sorted(agents) == ["demo-agent-1", "demo-agent-2"], demo.text
        assert "demo-agent-1 serves it" in demo.text
        tensor = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
        for url in agents.values():
            assert httpx.get(f"{url}/v2/health/live", timeout=10).status_code == 200
            answer = httpx.post(
                f"{url}/v2/models/digits-edge/infer", json={"inputs": [tensor]}, timeout=10
            )
            assert answer.status_code == 200, answer.text
        tree = demo.tree()
        assert len(tree) >= 5  # the demo, the broker, Redis and two agents
        demo.interrupt()
        assert demo.proc.returncode == 0, demo.text
        assert "Traceback" not in demo.text
        assert " ERROR " not in demo.text
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert alive == [], demo.text
    finally:
        stop_demo(demo)


def test_the_demo_says_what_it_does_and_not_what_libraries_do(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A newcomer reads where things are and what happens to the models, not INFO lines
    from httpx, alembic or onnxruntime's quantizer. The weak edge model keeps FP32 only (its
    INT8 child would be larger than its parent). The agent's log is under the data dir."""
    demo = start_demo(tmp_path, reference_onnx, "--duration", "0.5", "--agents", "1")
    try:
        demo.rest(timeout=60)
        assert demo.proc.returncode == 0, demo.text
        for where in ("API ", "registry", "MQTT", "Redis", "artifacts", "logs", "admin token"):
            assert where in demo.text
        assert "digits-edge-weak: no INT8 version" in demo.text
        assert "Deploying digits-edge:2 (INT8)" in demo.text
        assert not THIRD_PARTY_INFO.search(demo.text), demo.text
    finally:
        stop_demo(demo)
    home = tmp_path / "demo" / "agents" / "demo-agent-1"
    assert (home / "agent.json").is_file()  # written by `edge-agent enroll`
    assert not (home / "ready.json").exists()  # removed by the agent as it stopped
    log = (tmp_path / "demo" / "logs" / "demo-agent-1.log").read_text()
    assert f"local API {demo.agent_urls()['demo-agent-1']}" in log


def test_children_die_when_the_demo_is_killed_hard_and_it_comes_back(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """SIGKILL gives no chance to clean up: the kernel's parent-death signal stops the
    broker, Redis and the agent (an `edge-agent run` process). Started again on the same
    data dir, the demo finds its device and its models again, and the agent, its token still
    its broker login, is let in."""
    demo = start_demo(tmp_path, reference_onnx, "--agents", "1")
    try:
        demo.wait_for("demo-agent-1  local API")
        children = demo.tree()[1:]
        assert len(children) >= 3
        agent = next(p for p in children if "run" in p.cmdline())
        assert any(Path(arg).name == "edge-agent" for arg in agent.cmdline())
        demo.proc.kill()
        demo.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == []
    finally:
        stop_demo(demo)
    restarted = datetime.now(UTC)
    again = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "1")
    try:
        again.wait_for(READY_LINE)
        assert "digits-edge: already registered" in again.text
        assert "demo-agent-1 serves it" in again.text
        # What the registry says could be the first run's; this, the broker let in now (on
        # Mosquitto: the device's login outlived the broker, kept under the data dir).
        again.seen_since("demo-agent-1", restarted)
        assert "re-enrolling" not in again.text
        again.interrupt()
        assert again.proc.returncode == 0, again.text
    finally:
        stop_demo(again)
