"""Helpers for the dashboard's browser tests and bench: Debian's chromium driven by
Playwright (no browser download of its own), a real cloud (`edgefleet serve` in dev mode)
with devices that speak MQTT to it, and `edgefleet dashboard` over it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from shared import topics
from shared.topics import DeviceTopic

__all__ = [
    "CHROMIUM_ARGS",
    "ROOT",
    "Cloud",
    "Devices",
    "artifacts_dir",
    "chromium",
    "dashboard",
    "metric",
    "serve_cloud",
]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
TOKEN = "browser-test-admin-token-0123456789"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def artifacts_dir(name: str) -> Path:
    """Where screenshots go: $EDGEFLEET_TEST_ARTIFACTS/NAME, else .edgefleet/test-artifacts."""
    base = os.environ.get("EDGEFLEET_TEST_ARTIFACTS")
    path = (Path(base) if base else ROOT / ".edgefleet" / "test-artifacts") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _lines(proc: subprocess.Popen[str], into: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        into.put(line)


def _wait_line(lines: queue.Queue[str], marker: str, timeout: float, seen: list[str]) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"never printed {marker!r}:\n{''.join(seen)}")


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@dataclass
class Cloud:
    url: str
    mqtt_port: int
    data_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )

    def get(self, path: str, **params: Any) -> Any:
        with self.client() as client:
            answer = client.get(path, params=params)
        assert answer.status_code == 200, answer.text
        return answer.json()


@contextmanager
def serve_cloud(data_dir: Path, **env: str) -> Iterator[Cloud]:
    """`edgefleet serve` (API + fleet service, embedded rumqttd and Redis) on free ports."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen(
        [str(BIN / "edgefleet"), "serve", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=clean | {"EDGEFLEET_ADMIN_TOKEN": TOKEN, "EDGEFLEET_EMBEDDED_BROKER": "rumqttd",
                     "EDGEFLEET_HISTORY_FLUSH_S": "1", "COLUMNS": "200"} | env,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    try:
        api = _wait_line(lines, "  API ", 120, seen).split()[1]
        port = int(_wait_line(lines, "  MQTT ", 10, seen).split()[1].rsplit(":", 1)[1])
        yield Cloud(api, port, data_dir)
    finally:
        _stop(proc)


@contextmanager
def dashboard(cloud: Cloud, port: int, *, refresh_s: float = 2.0) -> Iterator[str]:
    """`edgefleet dashboard` over ``cloud``, the token on standard input; its URL."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen(
        [str(BIN / "edgefleet"), "dashboard", "--api-url", cloud.url, "--port", str(port),
         "--token-file", "-", "--log-file", str(cloud.data_dir / "dashboard.log")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
        env=clean | {"EDGEFLEET_DASHBOARD_REFRESH_S": str(refresh_s), "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write(TOKEN + "\n")
    proc.stdin.close()
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(proc, lines), daemon=True).start()
    try:
        line = _wait_line(lines, "Dashboard http", 90, [])
        yield line.split()[1]
    finally:
        _stop(proc)


class Devices:
    """Enrolled devices speaking MQTT to the cloud through one paho client, as agents do."""

    def __init__(self, cloud: Cloud) -> None:
        connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="browser-devices")
        self.client.on_connect = lambda *_a: connected.set()
        self.client.connect("127.0.0.1", cloud.mqtt_port)
        self.client.loop_start()
        assert connected.wait(10)

    def publish(self, device_id: str, kind: DeviceTopic, payload: dict[str, Any]) -> None:
        retain = kind in (DeviceTopic.PRESENCE, DeviceTopic.REPORTED)
        info = self.client.publish(
            topics.device_topic(device_id, kind), json.dumps(payload), qos=1, retain=retain
        )
        info.wait_for_publish(30)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def metric(page: Any, label: str) -> str:
    """The value of the st.metric labelled ``label`` on ``page`` (Playwright)."""
    box = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=label)
    )
    return str(box.locator('[data-testid="stMetricValue"]').first.inner_text()).strip()
