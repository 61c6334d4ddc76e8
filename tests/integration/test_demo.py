"""`edgefleet demo` as a user runs it: comes up, answers /readyz, Ctrl-C leaves no child."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

EDGEFLEET = shutil.which("edgefleet") or str(Path(sys.executable).parent / "edgefleet")


def _start(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.Popen(
        [EDGEFLEET, "demo", "--port", "0", "--data-dir", str(tmp_path / "demo"), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env | {"COLUMNS": "200"},
    )


def _wait_for_api_url(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        match = re.search(r"API\s+(http://127\.0\.0\.1:\d+)", line)
        if match:
            return match.group(1)
    proc.kill()
    pytest.fail("demo never printed its API URL:\n" + "".join(seen))


def test_demo_is_ready_and_ctrl_c_leaves_no_child_process(tmp_path: Path) -> None:
    proc = _start(tmp_path)
    try:
        url = _wait_for_api_url(proc)
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the broker and Redis
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        assert len(gone) == len(children)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_children_die_even_when_the_demo_is_killed_hard(tmp_path: Path) -> None:
    """SIGKILL gives no chance to clean up: the kernel's parent-death signal does it."""
    proc = _start(tmp_path)
    try:
        _wait_for_api_url(proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children
        proc.kill()
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_demo_with_a_duration_stops_by_itself(tmp_path: Path) -> None:
    proc = _start(tmp_path, "--duration", "2")
    url = _wait_for_api_url(proc)
    assert url.startswith("http://127.0.0.1:")
    assert proc.wait(timeout=30) == 0
