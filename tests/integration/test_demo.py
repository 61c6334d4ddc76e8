"""`edgefleet demo` as a user runs it: it says what it does, its agents are `edge-agent`
processes that serve the INT8 model, and Ctrl-C (or a hard kill) leaves no process behind."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
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
    """A running `edgefleet demo`: its output read by a thread of its own, so every wait
    has a working timeout and what it printed is kept for the failure message."""

    proc: subprocess.Popen[str]
    data_dir: Path
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    _ended: bool = False

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

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

    def _next(self, deadline: float) -> str | None:
        """The next line, or None at the end of the output or of the time."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if line is None:
            self._ended = True
            return None
        self.lines.append(line)
        return line

    def wait_for(self, marker: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while (line := self._next(deadline)) is not None:
            if marker in line:
                return
        stop_demo(self)
        pytest.fail(f"the demo never printed {marker!r}:\n{self.text}")

    def rest(self, timeout: float) -> None:
        """Wait for the demo to end and read what it printed up to then."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_demo(self)
            pytest.fail(f"the demo did not end within {timeout:g}s:\n{self.text}")
        deadline = time.monotonic() + 10
        while self._next(deadline) is not None:
            pass

    def assert_no_traceback(self) -> None:
        """Neither on the console nor in any log under the data dir (broker, Redis, agents)."""
        assert "Traceback" not in self.text, self.text
        logs = sorted((self.data_dir / "logs").glob("*.log"))
        assert logs, "the demo wrote no logs"
        for log in logs:
            assert "Traceback" not in log.read_text(errors="replace"), f"{log}:\n{log.read_text()}"


def start_demo(
    tmp_path: Path,
    reference: dict[str, bytes],
    *extra: str,
    env: dict[str, str] | None = None,
) -> Demo:
    """`edgefleet demo` on ``tmp_path/demo`` as a terminal runs it, with ``env`` added (and
    no simulated fleet unless ``extra`` asks for one: test_demo_fleet.py runs it)."""
    if "--sim-agents" not in extra:
        extra = (*extra, "--sim-agents", "0")
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
    return Demo(proc, data_dir)


def stop_demo(demo: Demo) -> None:
    if demo.proc.poll() is None:
        os.killpg(demo.proc.pid, signal.SIGKILL)
        demo.proc.wait(10)


def broker_process(demo: Demo) -> psutil.Process:
    """The demo's embedded broker: Mosquitto, or rumqttd where the machine has none."""
    for process in psutil.Process(demo.proc.pid).children():
        cmdline = " ".join(process.cmdline())
        if "mosquitto" in cmdline or "IotCoreBroker" in cmdline:
            return process
    raise AssertionError(f"the demo has no broker child:\n{demo.text}")


def test_ctrl_c_on_the_process_group_is_clean(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A terminal's Ctrl-C signals the whole foreground group. The demo is up with two agent
    processes serving the INT8 model; one agent dies, which the demo reports as a warning
    and goes on. SIGINT to the group: exit 0, no traceback on the console or in any log, no
    process of its tree left. Until now Redis died first and the cloud's handlers failed."""
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
        agent = next(p for p in tree if "run" in p.cmdline() and "demo-agent-2" in str(p.cmdline()))
        agent.kill()
        demo.wait_for("warning: demo-agent-2 exited (killed by SIGKILL)", timeout=20)
        assert demo.proc.poll() is None  # a dead agent is a warning, not the end
        demo.interrupt()
        assert demo.proc.returncode == 0, demo.text
        demo.assert_no_traceback()
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
    INT8 child would be larger than its parent). The agent's log is under the data dir; its
    token never was on a command line (the enroll writes it from its standard input)."""
    demo = start_demo(tmp_path, reference_onnx, "--duration", "0.5", "--agents", "1")
    try:
        demo.rest(timeout=60)
        assert demo.proc.returncode == 0, demo.text
        for where in ("API ", "registry", "MQTT", "Redis", "artifacts", "logs", "admin token"):
            assert where in demo.text
        assert "digits-edge-weak: no INT8 version" in demo.text
        assert "Deploying digits-edge:2 (INT8)" in demo.text
        assert demo.text.count("digits-cloud: done") == 1
        assert "digits-cloud: already registered" not in demo.text
        assert not THIRD_PARTY_INFO.search(demo.text), demo.text
        demo.assert_no_traceback()
    finally:
        stop_demo(demo)
    home = tmp_path / "demo" / "agents" / "demo-agent-1"
    assert (home / "agent.json").is_file()  # written by `edge-agent enroll`
    assert (home / "agent.json").stat().st_mode & 0o777 == 0o600
    assert not (home / "ready.json").exists()  # removed by the agent as it stopped
    log = (tmp_path / "demo" / "logs" / "demo-agent-1.log").read_text()
    assert f"local API {demo.agent_urls()['demo-agent-1']}" in log


def test_an_agent_that_cannot_enroll_ends_the_demo_with_its_reason(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """`edge-agent enroll` fails (the agent's folder is taken by a file): the demo stops in
    order and says why in one line, the agent's own words and no traceback or httpx chatter
    (it enrolls with --log-level WARNING); exit 1; the broker and Redis are gone."""
    (tmp_path / "demo" / "agents").mkdir(parents=True)
    (tmp_path / "demo" / "agents" / "demo-agent-1").write_text("not a folder")
    demo = start_demo(tmp_path, reference_onnx, "--agents", "1")
    try:
        demo.wait_for("Local edge agents")
        tree = demo.tree()
        demo.rest(timeout=60)
        assert demo.proc.returncode == 1, demo.text
        home = tmp_path / "demo" / "agents" / "demo-agent-1"
        assert re.search(
            r"EdgeFleet stopped: `edge-agent enroll` for demo-agent-1 failed \(code 1\): "
            rf"cannot write {re.escape(str(home / 'agent.json'))}: ",
            demo.text,
        ), demo.text
        assert "HTTP Request" not in demo.text
        demo.assert_no_traceback()
        assert psutil.wait_procs(tree, timeout=10)[1] == [], demo.text
    finally:
        stop_demo(demo)


def _token(tmp_path: Path, device_id: str) -> str:
    config = tmp_path / "demo" / "agents" / device_id / "agent.json"
    return str(json.loads(config.read_text())["token"])


def test_children_die_when_the_demo_is_killed_hard_and_it_comes_back(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """SIGKILL gives no chance to clean up: the kernel's parent-death signal stops the
    broker, Redis and the agents (`edge-agent run` processes). Started again on the same
    data dir, the demo finds its devices and its models again: demo-agent-1, its token still
    its broker login, is let in; demo-agent-2, gone from the registry meanwhile, is enrolled
    again; demo-agent-3, whose agent.json was lost, gets a new token. The demo says so, and
    says an agent serves the model only once it reported so after this start. Then its
    broker dies: the demo stops everything, says which service died and where its log is,
    and exits 1."""
    demo = start_demo(tmp_path, reference_onnx, "--agents", "3")
    try:
        demo.wait_for(READY_LINE)
        children = demo.tree()[1:]
        assert len(children) >= 5
        # `run` processes: the agents, and the dashboard (`python -m streamlit run`).
        agent = next(p for p in children if "run" in p.cmdline() and "streamlit" not in p.cmdline())
        assert any(Path(arg).name == "edge-agent" for arg in agent.cmdline())
        gone = httpx.delete(
            f"{demo.api_url()}/v1/devices/demo-agent-2",
            headers={"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"},
            timeout=10,
        )
        assert gone.status_code == 204, gone.text
        demo.proc.kill()
        demo.proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert alive == []
    finally:
        stop_demo(demo)
    token = _token(tmp_path, "demo-agent-1")
    (tmp_path / "demo" / "agents" / "demo-agent-3" / "agent.json").unlink()

    restarted = datetime.now(UTC)
    again = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "3")
    try:
        again.wait_for(READY_LINE)
        assert "digits-edge: already registered" in again.text
        assert "demo-agent-2 is not in the registry any more" in again.text
        assert "demo-agent-3 is enrolled, but its agent.json is gone: a new token" in again.text
        for device_id in ("demo-agent-1", "demo-agent-2", "demo-agent-3"):
            assert f"{device_id} serves it" in again.text, again.text
            # What the registry says could be the first run's; this, the broker let in now
            # (on Mosquitto: the device's login outlived the broker, kept under the data dir).
            again.seen_since(device_id, restarted)
        assert _token(tmp_path, "demo-agent-1") == token
        assert "re-enrolling" not in again.text
        tree = again.tree()
        broker_process(again).kill()
        again.rest(timeout=60)
        assert again.proc.returncode == 1, again.text
        log = tmp_path / "demo" / "logs" / "broker.log"
        assert re.search(
            rf"EdgeFleet stopped: the embedded broker \(\w+\) exited \(killed by SIGKILL\); "
            rf"see {re.escape(str(log.resolve()))}",
            again.text,
        ), again.text
        again.assert_no_traceback()
        assert psutil.wait_procs(tree, timeout=10)[1] == [], again.text
    finally:
        stop_demo(again)
