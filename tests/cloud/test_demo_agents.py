"""The demo's agents before they run: which token each enrolls with when the registry and the
agent folders disagree, how a failing or hanging `edge-agent enroll` ends, and when an agent
is said to serve the model. `edge-agent` is a stand-in here that records what it was given
(the real one runs in tests/integration/test_demo.py)."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import psutil
import pytest

from cloud.demo.agents import LocalAgents
from cloud.registry import repository
from shared.errors import ServiceUnavailable
from tests.conftest import ADMIN_TOKEN, RunningApi

# What `edge-agent` is asked to do: enroll (record argv and stdin, then succeed, fail or
# hang as told) or run (write the ready file, with the local API off, and wait).
STAND_IN = """
import json, os, pathlib, sys, time
mode, args = sys.argv[1], sys.argv[2:]
home = pathlib.Path(args[args.index("--data-dir") + 1])
home.mkdir(parents=True, exist_ok=True)
if "run" in args:
    ready = pathlib.Path(args[args.index("--ready-file") + 1])
    ready.write_text(json.dumps({"device_id": home.name, "api_url": None, "pid": os.getpid()}))
    time.sleep(60)
    sys.exit(0)
record = {"argv": args, "stdin": sys.stdin.read(), "pid": os.getpid()}
(home.parent / f"{home.name}.enroll.json").write_text(json.dumps(record))
if mode == "fail":
    print("cannot reach http://127.0.0.1:1: connection refused", file=sys.stderr)
    sys.exit(3)
if mode == "hang":
    time.sleep(60)
"""


class Demo:
    """LocalAgents on a real API, with the stand-in as `edge-agent` and what it says kept."""

    def __init__(self, api: RunningApi, tmp_path: Path, mode: str = "ok", count: int = 1):
        script = tmp_path / "edge_agent_stand_in.py"
        script.write_text(STAND_IN)
        self.data_dir = tmp_path / "demo"
        self.said: list[str] = []
        self.fleet = LocalAgents(
            command=[sys.executable, str(script), mode],
            api_url=api.url,
            admin_token=ADMIN_TOKEN,
            data_dir=self.data_dir,
            count=count,
            say=self.said.append,
            enroll_timeout=2,
        )
        self.api = api

    def enrolled(self, device_id: str) -> dict[str, Any]:
        path = self.data_dir / "agents" / f"{device_id}.enroll.json"
        return dict(json.loads(path.read_text()))

    def token(self, device_id: str) -> str:
        return str(self.enrolled(device_id)["stdin"]).strip()

    def owner(self, token: str) -> str | None:
        """The device a token belongs to, as the API says; None when it is refused."""
        with self.api.client(token) as c:
            answer = c.get("/v1/device")
        return str(answer.json()["device"]["id"]) if answer.status_code == 200 else None

    def save_config(self, device_id: str, text: str) -> Path:
        home = self.data_dir / "agents" / device_id
        home.mkdir(parents=True, exist_ok=True)
        (home / "agent.json").write_text(text)
        return home

    def start(self, stop: threading.Event | None = None) -> None:
        try:
            self.fleet.start(stop or threading.Event())
        finally:
            self.fleet.stop()


def _enroll(api: RunningApi, device_id: str) -> str:
    with api.client() as c:
        answer = c.post("/v1/devices", json={"device_id": device_id})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["token"])


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_the_token_reaches_enroll_on_stdin_never_in_its_argv(
    api: RunningApi, tmp_path: Path
) -> None:
    """Anyone on the machine reads a process's argv (`ps`); the token goes on standard
    input. Enroll runs with --log-level WARNING, so a failure says only what went wrong.
    An agent whose ready file has no API URL is one with its local API off, not "None"."""
    demo = Demo(api, tmp_path)
    stop = threading.Event()
    try:
        [agent] = demo.fleet.start(stop)
    finally:
        demo.fleet.stop()
    record = demo.enrolled("demo-agent-1")
    token = demo.token("demo-agent-1")
    assert demo.owner(token) == "demo-agent-1"
    assert not any(token in arg for arg in record["argv"])
    assert record["argv"][record["argv"].index("--token-file") + 1] == "-"
    assert record["argv"][record["argv"].index("--log-level") + 1] == "WARNING"
    assert agent.api_url is None


def test_a_failing_enroll_is_one_clear_error_and_leaves_no_process(
    api: RunningApi, tmp_path: Path
) -> None:
    demo = Demo(api, tmp_path, "fail", count=2)
    with pytest.raises(ServiceUnavailable) as caught:
        demo.start()
    assert caught.value.message == (
        "`edge-agent enroll` for demo-agent-1 failed (code 3): "
        "cannot reach http://127.0.0.1:1: connection refused"
    )
    assert all(_gone(demo.enrolled(d)["pid"]) for d in ("demo-agent-1", "demo-agent-2"))


def test_an_enroll_that_hangs_is_stopped_after_its_time(api: RunningApi, tmp_path: Path) -> None:
    """Both enrolls hang: after the time allowed, one error names them, and both processes
    are killed and reaped (before, the first failure left the others running)."""
    demo = Demo(api, tmp_path, "hang", count=2)
    with pytest.raises(ServiceUnavailable, match=r"for demo-agent-1, demo-agent-2 did not finish"):
        demo.start()
    assert all(_gone(demo.enrolled(d)["pid"]) for d in ("demo-agent-1", "demo-agent-2"))


def test_ctrl_c_while_enroll_runs_is_heard(api: RunningApi, tmp_path: Path) -> None:
    """The first Ctrl-C (``stop``) ends the wait for a hanging enroll: start returns no
    agent and raises nothing, and the enroll process is gone."""
    demo = Demo(api, tmp_path, "hang")
    demo.fleet.enroll_timeout = 60
    stop = threading.Event()
    record = demo.data_dir / "agents" / "demo-agent-1.enroll.json"

    def ctrl_c_once_enrolling() -> None:
        while not record.is_file():
            stop.wait(0.02)
        stop.set()

    threading.Thread(target=ctrl_c_once_enrolling, daemon=True).start()
    try:
        assert demo.fleet.start(stop) == []
    finally:
        demo.fleet.stop()
    assert _gone(demo.enrolled("demo-agent-1")["pid"])


def test_a_device_enrolled_without_its_agent_json_gets_a_new_token(
    api: RunningApi, tmp_path: Path
) -> None:
    """The registry knows demo-agent-1 (409 on enrollment), its folder has no agent.json:
    the demo rotates its token, says so, and enrolls with the new one; the old one is dead."""
    old = _enroll(api, "demo-agent-1")
    demo = Demo(api, tmp_path)
    demo.start()
    new = demo.token("demo-agent-1")
    assert new != old
    assert (demo.owner(new), demo.owner(old)) == ("demo-agent-1", None)
    assert "  demo-agent-1 is enrolled, but its agent.json is gone: a new token" in demo.said


def test_a_device_gone_from_the_registry_is_enrolled_again_with_a_clean_folder(
    api: RunningApi, tmp_path: Path
) -> None:
    """agent.json keeps a token the registry no longer knows (registry.db removed): 401.
    The device is not in the registry, so it is enrolled again, as a new device: what its
    folder held (models of a rev history that is gone) is cleared first."""
    demo = Demo(api, tmp_path)
    home = demo.save_config("demo-agent-1", json.dumps({"token": "efd_from-a-lost-registry"}))
    (home / "store").mkdir()
    demo.start()
    assert demo.owner(demo.token("demo-agent-1")) == "demo-agent-1"
    assert not (home / "store").exists()
    assert any("demo-agent-1 is not in the registry any more" in line for line in demo.said)


def test_a_refused_token_of_a_known_device_is_replaced(api: RunningApi, tmp_path: Path) -> None:
    """The registry has the device but not its saved token (rotated by someone): 401, then
    a new token; the folder is kept."""
    saved = _enroll(api, "demo-agent-1")
    with api.client() as c:
        assert c.post("/v1/devices/demo-agent-1/token").status_code == 200
    demo = Demo(api, tmp_path)
    home = demo.save_config("demo-agent-1", json.dumps({"token": saved}))
    demo.start()
    assert demo.owner(demo.token("demo-agent-1")) == "demo-agent-1"
    assert (home / "agent.json").read_text() == json.dumps({"token": saved})  # enroll's job
    assert "  demo-agent-1: the registry refuses its saved token: a new token" in demo.said


def test_a_token_the_registry_accepts_is_kept(api: RunningApi, tmp_path: Path) -> None:
    saved = _enroll(api, "demo-agent-1")
    demo = Demo(api, tmp_path)
    demo.save_config("demo-agent-1", json.dumps({"token": saved}))
    demo.start()
    assert demo.token("demo-agent-1") == saved
    assert demo.said == []


def test_an_unreadable_agent_json_is_said_and_the_device_gets_a_new_token(
    api: RunningApi, tmp_path: Path
) -> None:
    _enroll(api, "demo-agent-1")
    demo = Demo(api, tmp_path)
    demo.save_config("demo-agent-1", "{not json")
    demo.start()
    assert demo.owner(demo.token("demo-agent-1")) == "demo-agent-1"
    assert any("agent.json is unreadable" in line for line in demo.said)


def test_an_agent_serves_the_model_only_once_it_reported_so_after_this_start(
    api: RunningApi, tmp_path: Path
) -> None:
    """The registry still shows digits-edge:2 active from an earlier run: that is not an
    answer. Only a report with the rev signed in this run applied counts."""
    _enroll(api, "demo-agent-1")

    def report(rev: int) -> None:
        with api.context.database.session() as s:
            device = repository.get_device(s, device_id="demo-agent-1")
            device.reported = {"rev_applied": rev, "active": {"digits-edge": 2}}

    report(1)
    demo = Demo(api, tmp_path)
    try:
        stale = demo.fleet.wait_active(
            "digits-edge", 2, {"demo-agent-1": 2}, threading.Event(), 0.5
        )
        assert stale == []
        report(2)
        fresh = demo.fleet.wait_active("digits-edge", 2, {"demo-agent-1": 2}, threading.Event(), 10)
        assert [a.device_id for a in fresh] == ["demo-agent-1"]
    finally:
        demo.fleet.stop()
