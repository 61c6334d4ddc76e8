"""How the cloud ends when it does not end well: a hook that fails, an embedded service that
dies, a second Ctrl-C during the stop. Each time every child is stopped and reaped, and the
CLI says what happened in one line, with the exit status that goes with it."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import click
import httpx
import psutil
import pytest

from cloud import cli
from cloud.context import CloudContext
from cloud.fleet.service import FleetService
from cloud.launcher import run_cloud, stop_on_signals
from cloud.settings import CloudSettings
from shared.errors import ServiceUnavailable


def _settings(tmp_path: Path) -> CloudSettings:
    return CloudSettings(data_dir=tmp_path / "cloud", dev_mode=True, api_port=0)


class Children:
    """The child processes run_cloud starts: those that were not there before it ran."""

    def __init__(self) -> None:
        self.before = {p.pid for p in psutil.Process().children()}
        self.seen: list[psutil.Process] = []

    def look(self) -> list[psutil.Process]:
        self.seen = [p for p in psutil.Process().children() if p.pid not in self.before]
        return self.seen

    def named(self, name: str) -> psutil.Process:
        return next(p for p in self.look() if name in Path(p.cmdline()[0]).name)

    def all_gone(self) -> bool:
        return bool(self.seen) and psutil.wait_procs(self.seen, timeout=10)[1] == []


def test_sighup_stops_like_sigterm() -> None:
    """A closed terminal sends SIGHUP: the cloud stops in order, as on SIGTERM, instead of
    dying at once with its children left to the parent-death signal."""
    stop = threading.Event()
    with stop_on_signals(stop):
        signal.raise_signal(signal.SIGHUP)
        assert stop.wait(10)


def test_one_ctrl_c_is_never_taken_for_two() -> None:
    """The first SIGINT sets ``stop`` (from the signal reader's thread) and raises nothing,
    even when ``stop`` is already set by the time the main thread runs its handler; the
    second one interrupts."""
    stop = threading.Event()
    with stop_on_signals(stop):
        helper = threading.Thread(
            target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        )
        helper.start()
        assert stop.wait(10)  # woken by the reader; the handler runs here, after it
        helper.join()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)


def test_a_signal_that_lands_on_another_thread_still_stops_the_cloud(tmp_path: Path) -> None:
    """The kernel may hand a process's SIGTERM to any of its threads. Before, the handler
    then waited for the main thread, asleep in ``stop.wait()`` with no timeout, to run it:
    it never did (an agent was seen ignoring SIGTERM for good). The watchdog stands in for
    the operator who would have had to kill it."""
    stop = threading.Event()
    rescued: list[bool] = []

    def sigterm_on_another_thread(
        _context: CloudContext, _url: str, _stop: threading.Event
    ) -> None:
        def to_myself_once_the_main_thread_waits() -> None:
            time.sleep(0.5)
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

        threading.Thread(target=to_myself_once_the_main_thread_waits, daemon=True).start()

    def rescue() -> None:
        rescued.append(True)
        stop.set()

    watchdog = threading.Timer(20, rescue)
    watchdog.start()
    try:
        run_cloud(_settings(tmp_path), on_ready=sigterm_on_another_thread, stop=stop)
    finally:
        watchdog.cancel()
    assert rescued == []


def test_a_failing_hook_stops_every_child_and_the_cli_says_why_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """on_ready raises (an unexpected error, not one of ours): the API, the fleet and the
    embedded services all stop, and `edgefleet` ends with exit 1 and a one-line reason."""
    children = Children()
    stopped: list[str] = []

    def on_ready(_context: CloudContext, _url: str, _stop: threading.Event) -> None:
        assert len(children.look()) >= 2  # the broker and Redis
        raise RuntimeError("the hook broke")

    with pytest.raises(click.exceptions.Exit) as ended:
        cli._run_until_stopped(
            _settings(tmp_path), None, on_ready=on_ready, on_stop=lambda: stopped.append("stop")
        )
    assert ended.value.exit_code == 1
    assert stopped == ["stop"]
    assert children.all_gone()
    out = capsys.readouterr().out
    assert "EdgeFleet stopped by an unexpected error: RuntimeError: the hook broke" in out
    assert "Traceback" not in out


def test_an_embedded_service_that_dies_stops_everything_and_says_which(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis is killed while the cloud serves: within a second or so the launcher sees it,
    stops the hooks, the API and the fleet, then the broker, and raises naming Redis and its
    log. Until now it served on, its Redis gone, until someone pressed Ctrl-C."""
    children = Children()
    stopped: list[str] = []
    fleet_stop = FleetService.stop

    def counting_fleet_stop(self: FleetService) -> None:
        stopped.append("fleet")
        fleet_stop(self)

    monkeypatch.setattr(FleetService, "stop", counting_fleet_stop)

    def kill_redis(_context: CloudContext, _url: str, _stop: threading.Event) -> None:
        os.kill(children.named("redis").pid, signal.SIGKILL)

    settings = _settings(tmp_path)
    with pytest.raises(ServiceUnavailable) as caught:
        run_cloud(
            settings,
            duration=60,  # a watch that never sees it ends the test with "did not raise"
            on_ready=kill_redis,
            on_stop=lambda: stopped.append("hook"),
        )
    log = settings.data_dir / "logs" / "redis.log"
    assert caught.value.message == f"the embedded redis exited (killed by SIGKILL); see {log}"
    assert stopped == ["hook", "fleet"]
    assert children.all_gone()


def test_a_second_ctrl_c_still_runs_every_stop_step_and_exits_130(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first Ctrl-C starts the orderly stop; a second one, arriving while the hook stops
    (the demo's agents), cuts that step short, but the API, the fleet and the embedded
    services are still stopped, and the CLI says it was interrupted, exit 130, instead of
    claiming every process is gone."""
    children = Children()
    api_url: list[str] = []

    def first_ctrl_c(_context: CloudContext, url: str, _stop: threading.Event) -> None:
        children.look()
        api_url.append(url)
        signal.raise_signal(signal.SIGINT)

    def second_ctrl_c() -> None:
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("the second Ctrl-C did not interrupt the step")

    with pytest.raises(click.exceptions.Exit) as ended:
        cli._run_until_stopped(
            _settings(tmp_path), None, on_ready=first_ctrl_c, on_stop=second_ctrl_c
        )
    assert ended.value.exit_code == 130
    assert children.all_gone()
    out = capsys.readouterr().out
    assert "EdgeFleet interrupted" in out
    assert "every child process is gone" not in out
    assert not _answers(api_url[0])


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/readyz", timeout=2)
    except httpx.HTTPError:
        return False
    return True


def test_a_websocket_upgrade_to_the_api_gets_a_json_answer(tmp_path: Path) -> None:
    """The REST API has no WebSocket routes: an upgrade is answered like any unknown request,
    in JSON (uvicorn's WebSocket layer answered a plain-text 403)."""
    stop = threading.Event()
    answers: list[httpx.Response] = []

    def upgrade(_context: CloudContext, url: str, stop_: threading.Event) -> None:
        headers = {
            "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        }  # fmt: skip
        try:
            answers.append(httpx.get(f"{url}/v1/stream", headers=headers, timeout=10))
        finally:
            stop_.set()

    run_cloud(_settings(tmp_path), on_ready=upgrade, stop=stop)
    assert len(answers) == 1
    assert answers[0].status_code in (404, 405)
    assert answers[0].headers["content-type"].startswith("application/json")
