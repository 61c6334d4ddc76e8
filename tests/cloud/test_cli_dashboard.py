"""`edgefleet dashboard` refuses what it cannot run with in one line, before it starts
anything: no admin token anywhere, a port already taken, a token file that is not there."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

EDGEFLEET = shutil.which("edgefleet") or str(Path(sys.executable).parent / "edgefleet")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    return subprocess.run(
        [EDGEFLEET, "dashboard", *args], capture_output=True, text=True, timeout=60,
        env=clean | (env or {}) | {"COLUMNS": "200"}, check=False,
    )  # fmt: skip


def test_no_token_is_one_line_and_nothing_starts() -> None:
    done = _run("--port", "0")
    assert done.returncode == 2
    assert "no admin token" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_a_taken_port_or_a_missing_token_file_is_refused(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("--port", str(port), env={"EDGEFLEET_DASHBOARD_TOKEN": "x" * 20})
    assert done.returncode == 2
    assert f"127.0.0.1:{port} is taken" in done.stderr
    done = _run("--port", "0", "--token-file", str(tmp_path / "absent"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
