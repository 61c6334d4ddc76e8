"""`edgefleet demo` starts the dashboard too: it prints its URL, the dashboard answers there,
the real agents' telemetry reaches the history it charts, and Ctrl-C stops it with the rest."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import psutil

from cloud.settings import DEV_ADMIN_TOKEN
from tests.fleet_harness import wait_for
from tests.integration.test_demo import READY_LINE, start_demo, stop_demo


def test_the_demo_prints_the_dashboards_url_and_stops_it(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    demo = start_demo(tmp_path, reference_onnx, "--duration", "120", "--agents", "1",
                      "--dashboard-port", "0", env={"EDGEFLEET_HISTORY_FLUSH_S": "1"})  # fmt: skip
    try:
        demo.wait_for(READY_LINE, timeout=180)
        match = re.search(r"Dashboard\s+(http://127\.0\.0\.1:\d+)", demo.text)
        assert match, demo.text
        url = match.group(1)
        assert httpx.get(f"{url}/_stcore/health", timeout=10).status_code == 200
        streamlit = [p for p in demo.tree() if "streamlit" in " ".join(p.cmdline())]
        assert len(streamlit) == 1, demo.text
        # The agent's telemetry windows (every 10 s) come through the ingest into the history.
        headers = {"Authorization": f"Bearer {DEV_ADMIN_TOKEN}"}

        def windows() -> int:
            answer = httpx.get(f"{demo.api_url()}/v1/history/fleet", headers=headers, timeout=10)
            return int(answer.json()["totals"]["windows"])

        wait_for(lambda: windows() >= 1, 60, "a telemetry window of the demo's agent")
        tree = demo.tree()
        demo.interrupt()
        assert demo.proc.returncode == 0, demo.text
        assert "Stopping the dashboard" in demo.text
        demo.assert_no_traceback()
        assert psutil.wait_procs(tree, timeout=10)[1] == [], demo.text
    finally:
        stop_demo(demo)
