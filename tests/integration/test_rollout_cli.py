"""`edgefleet rollout …` against a running API with real agents: start with the live view
to the end (exit 0), undeploy, pause/resume/abort (exit 3 when the watch ends ABORTED), a
superseded rollout (exit 4), errors as one line, and Ctrl-C that leaves the rollout running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cloud.cli import app
from edge_agent.agent import Agent
from tests.conftest import ADMIN_TOKEN
from tests.fleet_harness import Cloud
from tests.integration.test_rollouts import _label, _rollout, _serving

runner = CliRunner()


def _cli(cloud: Cloud, *args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["rollout", *args, "--api", cloud.url, "--token", ADMIN_TOKEN])
    return result.exit_code, result.output


def _started_id(output: str) -> int:
    found = re.search(r"rollout (\d+) started", output)
    assert found, output
    return int(found.group(1))


def _fleet(
    cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes], count: int
) -> tuple[list[Agent], int, int]:
    """``count`` labelled agents on v1 (rolled out through the CLI), and v2 registered."""
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(count)]
    _label(cloud, agents)
    v1 = cloud.register("digits-edge", reference_onnx["digits-edge"])
    code, output = _cli(
        cloud, "start", "digits-edge", str(v1), "-l", "site=lab", "--canary", str(count),
        "--watch", "--interval", "0.2",
    )  # fmt: skip
    assert code == 0, output
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    return agents, v1, v2


def test_start_with_the_live_view_follows_the_waves_to_completed(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """Canary 1, growth 2 on three devices: the view ends COMPLETED with exit 0, one bar per
    wave; list and show tell the same."""
    cloud = embedded_cloud
    agents, _v1, v2 = _fleet(cloud, agent_dir, reference_onnx, 3)
    code, output = _cli(
        cloud, "start", "digits-edge", str(v2), "--label", "site=lab", "--canary", "1",
        "--growth", "2", "--device-timeout", "60", "--watch", "--interval", "0.2",
    )  # fmt: skip
    assert code == 0, output
    rollout_id = _started_id(output)
    assert f"rollout {rollout_id} started: digits-edge → v{v2} on 3 devices in 2 waves (1, 2)" in (
        output
    )
    assert "Ctrl-C stops watching; the rollout goes on" in output
    assert re.search(r"wave 1 .* 1/1 +ACTIVE 1", output), output
    assert re.search(r"wave 2 .* 2/2 +ACTIVE 2", output), output
    assert f"rollout {rollout_id} COMPLETED: ACTIVE 3" in output
    assert {_serving(a) for a in agents} == {v2}
    assert _rollout(cloud, rollout_id)["strategy"]["device_timeout_s"] == 60

    code, listed = _cli(cloud, "list", "--model", "digits-edge")
    assert code == 0
    assert re.search(rf"{rollout_id} +│ digits-edge → v{v2} +│ COMPLETED", listed), listed
    code, shown = _cli(cloud, "show", str(rollout_id))
    assert code == 0
    assert f"rollout {rollout_id} · digits-edge → v{v2} · COMPLETED · wave 2 of 2" in shown


def test_undeploy_with_the_live_view_ends_with_every_device_removed(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    cloud = embedded_cloud
    agents, _v1, _v2 = _fleet(cloud, agent_dir, reference_onnx, 2)
    code, output = _cli(
        cloud, "undeploy", "digits-edge", "-l", "site=lab", "--canary", "1", "--watch",
        "--interval", "0.2",
    )  # fmt: skip
    assert code == 0, output
    rollout_id = _started_id(output)
    assert f"rollout {rollout_id} started: undeploy digits-edge on 2 devices" in output
    assert f"rollout {rollout_id} COMPLETED: REMOVED 2" in output
    assert {_serving(a) for a in agents} == {None}


def test_pause_resume_and_abort_and_a_watch_that_ends_aborted(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """With the engine held, the operator pauses (twice: the second is one red line, exit
    1), resumes and aborts; the watch then ends ABORTED with exit 3 and nothing changed."""
    cloud = embedded_cloud
    agents, v1, v2 = _fleet(cloud, agent_dir, reference_onnx, 2)
    cloud.fleet.rollouts.stop()
    code, output = _cli(cloud, "start", "digits-edge", str(v2), "-l", "site=lab")
    assert code == 0, output
    rollout_id = _started_id(output)

    code, output = _cli(cloud, "pause", str(rollout_id))
    assert (code, output.strip()) == (0, f"rollout {rollout_id} PAUSED: PENDING 2")
    code, output = _cli(cloud, "pause", str(rollout_id))
    assert code == 1
    assert output.strip() == f"error 409: rollout {rollout_id} is PAUSED: cannot pause it"
    code, output = _cli(cloud, "resume", str(rollout_id))
    assert (code, output.strip()) == (0, f"rollout {rollout_id} IN_PROGRESS: PENDING 2")
    code, output = _cli(cloud, "abort", str(rollout_id))
    assert code == 0
    assert output.strip() == f"rollout {rollout_id} ABORTING (aborted by admin): PENDING 2"

    cloud.fleet.rollouts.start()
    code, output = _cli(cloud, "watch", str(rollout_id), "--interval", "0.2")
    assert code == 3, output
    assert f"rollout {rollout_id} ABORTED (aborted by admin): SKIPPED 2" in output
    assert {_serving(a) for a in agents} == {v1}


def test_a_watch_of_a_superseded_rollout_exits_4(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    cloud = embedded_cloud
    _agents, v1, v2 = _fleet(cloud, agent_dir, reference_onnx, 1)
    cloud.fleet.rollouts.stop()
    older = _started_id(_cli(cloud, "start", "digits-edge", str(v2), "-l", "site=lab")[1])
    newer = _started_id(_cli(cloud, "start", "digits-edge", str(v1), "-l", "site=lab")[1])
    code, output = _cli(cloud, "watch", str(older), "--interval", "0.2")
    assert code == 4, output
    assert f"rollout {older} SUPERSEDED (superseded by rollout {newer}): SKIPPED 1" in output


def test_errors_are_one_line_never_a_traceback(embedded_cloud: Cloud) -> None:
    """An unknown rollout, a model nobody has, an API that is not there, a label that is not
    KEY=VALUE: each a clear message and a non-zero exit."""
    cloud = embedded_cloud
    code, output = _cli(cloud, "watch", "999")
    assert (code, output.strip()) == (1, "error 404: unknown rollout 999")
    code, output = _cli(cloud, "undeploy", "ghost")
    assert (code, output.strip()) == (1, "error 404: unknown model 'ghost'")
    code, output = _cli(cloud, "start", "m", "1", "--label", "site")
    assert code == 2
    assert "'site' is not KEY=VALUE" in output
    result = runner.invoke(app, ["rollout", "list", "--api", "http://127.0.0.1:9"])
    assert result.exit_code == 2
    assert result.output.startswith("cannot reach the cloud API at http://127.0.0.1:9: ")
    assert len(result.output.strip().splitlines()) == 1
    for text in (output, result.output):
        assert "Traceback" not in text


def test_ctrl_c_stops_watching_and_leaves_the_rollout_running(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A real `edgefleet rollout watch` process gets SIGINT: it says the rollout goes on and
    how to follow or stop it, exits 130, and the rollout is still IN_PROGRESS."""
    cloud = embedded_cloud
    _fleet(cloud, agent_dir, reference_onnx, 1)
    cloud.fleet.rollouts.stop()  # so the rollout cannot end while we watch
    rollout_id = _started_id(_cli(cloud, "start", "digits-edge", "1", "-l", "site=lab")[1])
    watch = subprocess.Popen(
        [sys.executable, "-c", "from cloud.cli import main; main()", "rollout", "watch",
         str(rollout_id), "--api", cloud.url, "--token", ADMIN_TOKEN],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        first = watch.stdout.readline()
        assert first.startswith(f"watching rollout {rollout_id}"), first
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=30)
        rest = watch.stdout.read()  # through the same buffer as readline (communicate is not)
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()
    assert watch.returncode == 130, rest
    assert f"stopped watching: rollout {rollout_id} goes on (IN_PROGRESS)" in rest
    assert f"edgefleet rollout abort {rollout_id}" in rest
    assert "Traceback" not in rest
    assert _rollout(cloud, rollout_id)["state"] == "IN_PROGRESS"
