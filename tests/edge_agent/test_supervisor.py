"""The SuperNode supervisor with a real `flower-supernode`: a SuperLink out of reach is a
jittered backoff that telemetry can explain, stop takes the whole process group down, and a
missing executable is said once, not retried."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from cloud.embedded.processes import free_port
from cloud.federated.flower import flower_command
from edge_agent.federated.supervisor import (
    SupernodeConfig,
    SupernodeState,
    SupernodeSupervisor,
    write_node_config,
)
from shared.retry import Backoff
from tests.federated_support import wait_until

pytestmark = pytest.mark.federated


def _config(tmp_path: Path, command: list[str], timeout: float) -> SupernodeConfig:
    return SupernodeConfig(
        command=command,
        superlink=f"127.0.0.1:{free_port()}",  # nobody listens there
        node_config_file=write_node_config(
            tmp_path / "node.toml", device_id="cam-1", data_dir=tmp_path
        ),
        home=tmp_path / "flower",
        log_path=tmp_path / "supernode.log",
        insecure=True,
        connect_timeout_s=timeout,
    )


def test_an_unreachable_superlink_is_a_backoff_with_the_reason(tmp_path: Path) -> None:
    supervisor = SupernodeSupervisor(
        _config(tmp_path, [flower_command("flower-supernode")], timeout=1.0),
        backoff=Backoff(base=0.2, cap=0.5),
    )
    supervisor.start()
    try:
        status = wait_until(
            lambda: (s := supervisor.status()).restarts >= 2 and s, 120, "two restarts"
        )
        assert status.state in (SupernodeState.BACKOFF, SupernodeState.STARTING)
        assert "refused or was out of reach" in (status.reason or "")
        assert "Failed to initialize the connection" in (tmp_path / "supernode.log").read_text()
    finally:
        supervisor.stop()
    assert supervisor.status().state is SupernodeState.STOPPED


def test_stop_takes_the_supernode_and_what_it_started_down(tmp_path: Path) -> None:
    supervisor = SupernodeSupervisor(
        _config(tmp_path, [flower_command("flower-supernode")], timeout=600.0)
    )
    supervisor.start()
    try:
        pid = wait_until(lambda: supervisor.pid, 30, "the SuperNode to start")
        family = wait_until(
            lambda: (p := psutil.Process(pid)).children(recursive=True) and [p, *p.children()],
            60, "its SuperExec",
        )  # fmt: skip
    finally:
        supervisor.stop()
    _gone, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []
    assert supervisor.pid is None


def test_a_missing_supernode_is_reported_not_retried(tmp_path: Path) -> None:
    supervisor = SupernodeSupervisor(
        _config(tmp_path, [str(tmp_path / "no-such-supernode")], timeout=1.0)
    )
    supervisor.start()
    status = wait_until(
        lambda: (s := supervisor.status()).state is SupernodeState.MISSING and s, 10, "MISSING"
    )
    assert "cannot run the SuperNode" in (status.reason or "")
    assert status.restarts == 0
    supervisor.stop()
