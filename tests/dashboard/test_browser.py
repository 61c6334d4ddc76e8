"""The dashboard in a real browser (Debian's headless chromium, driven by Playwright) over a
real cloud (`edgefleet serve`) whose devices spoke MQTT to it: every page opens, its key
numbers are the API's, and the Pause and Abort buttons change a live rollout. Screenshots of
each page are kept in the folder the test prints."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud.embedded.processes import free_port
from cloud.settings import CloudSettings
from shared.topics import DeviceTopic
from tests.conftest import seed_reference_cache
from tests.dashboard.browser import (
    CHROMIUM_ARGS,
    TOKEN,
    Cloud,
    Devices,
    artifacts_dir,
    chromium,
    dashboard,
    metric,
    serve_cloud,
)
from tests.fleet_harness import wait_for
from tests.history_support import AGENT_BOUNDS_MS

DEVICES = 60
MINUTES = 15


def _need_browser() -> str:
    """The chromium binary; skipped (failed under CI) when it or Playwright is missing."""
    path = chromium()
    reason = None
    if path is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright's Python package is not installed (the dev extra has it)"
    if reason is not None:
        if os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason}, and EDGEFLEET_REQUIRE_SERVICES=1 requires it")
        pytest.skip(reason)
    assert path is not None
    return path


def _telemetry(at: datetime, index: int, minute: int) -> dict[str, Any]:
    rows = 30 + index % 9
    buckets = [0] * (len(AGENT_BOUNDS_MS) + 1)
    buckets[3], buckets[5], buckets[8] = rows - 5, 4, 1
    return {
        "schema_version": 1, "window_s": 60.0, "at": at.isoformat(),
        "counts": {"answers_edge": rows - 4, "answers_cloud": 4, "rows_total": rows,
                   "rows_hard": 4 + index % 3, "rows_cloud": 4,
                   "rows_degraded": int(index % 12 == 0 and minute > MINUTES - 3),
                   "degraded": int(index % 12 == 0 and minute > MINUTES - 3)},
        "latency_ms": {"bounds": AGENT_BOUNDS_MS, "counts": buckets},
        "active": {"digits-edge": 2},
    }  # fmt: skip


def _populate(cloud: Cloud) -> int:
    """Reference models, enrolled devices, their MQTT reports; a rollout to the lab."""
    with cloud.client() as client:
        made = client.post("/v1/reference-models", json={"models": ["digits-edge"]})
        assert made.status_code == 201, made.text
        for index in range(DEVICES):
            site = "lab" if index % 2 else "field"
            answer = client.post(
                "/v1/devices", json={"device_id": f"cam-{index:03d}", "labels": {"site": site}}
            )
            assert answer.status_code == 201, answer.text
    devices = Devices(cloud)
    now = datetime.now(UTC)
    try:
        for index in range(DEVICES):
            device_id = f"cam-{index:03d}"
            state = "online" if index % 6 else "offline"
            devices.publish(device_id, DeviceTopic.PRESENCE, {"state": state})
            devices.publish(
                device_id, DeviceTopic.REPORTED,
                {"rev_applied": 0, "active": {"digits-edge": 2}, "agent_version": "sim"},
            )  # fmt: skip
            for minute in range(MINUTES):
                at = now - timedelta(minutes=MINUTES - minute)
                devices.publish(device_id, DeviceTopic.TELEMETRY, _telemetry(at, index, minute))
            for state in ("DOWNLOADING", "FAILED" if index % 10 == 9 else "ACTIVE"):
                event = {"rev": 1, "model": "digits-edge", "version": 2, "state": state,
                         "at": now.isoformat(), "schema_version": 1}  # fmt: skip
                devices.publish(device_id, DeviceTopic.STATUS, event)
    finally:
        devices.close()
    expected = DEVICES * MINUTES
    wait_for(
        lambda: cloud.get("/v1/history/fleet")["totals"]["windows"] == expected,
        60, f"{expected} telemetry windows in the history",
    )  # fmt: skip
    with cloud.client() as client:
        rollout = client.post(
            "/v1/rollouts",
            json={"model": "digits-edge", "version": 2, "selector": {"site": "lab"},
                  "strategy": {"canary": 3, "growth": 3, "device_timeout_s": 600}},
        )  # fmt: skip
        assert rollout.status_code == 201, rollout.text
    return int(rollout.json()["id"])


@pytest.fixture(scope="module")
def browser_path() -> str:
    return _need_browser()


@pytest.fixture(scope="module")
def live(
    browser_path: str, tmp_path_factory: pytest.TempPathFactory, reference_onnx: dict[str, bytes]
) -> Iterator[tuple[Cloud, str, int]]:
    data_dir: Path = tmp_path_factory.mktemp("browser") / "cloud"
    seed_reference_cache(CloudSettings(data_dir=data_dir, admin_token=TOKEN), reference_onnx)
    with serve_cloud(data_dir) as cloud:
        rollout_id = _populate(cloud)
        with dashboard(cloud, free_port()) as url:
            yield cloud, url, rollout_id


@pytest.fixture(scope="module")
def page(live: tuple[Cloud, str, int], browser_path: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1500, "height": 1100})
            context.set_default_timeout(30_000)
            yield context.new_page()
        finally:
            browser.close()


SHOTS = artifacts_dir("dashboard-browser")


def _open(page: Any, url: str, name: str, ready: str) -> None:
    page.goto(url)
    page.get_by_text(ready, exact=False).first.wait_for()
    page.wait_for_load_state("networkidle")


def _shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    print(f"screenshot: {SHOTS / name}.png")


def test_fleet_page_counts_are_the_apis(page: Any, live: tuple[Cloud, str, int]) -> None:
    cloud, url, _rollout = live
    _open(page, f"{url}/", "fleet", "Devices by latest deployment state")  # the default page
    summary = cloud.get("/v1/fleet/summary")
    wait_for(lambda: metric(page, "Online") == str(summary["presence"]["online"]), 20, "Online")
    assert metric(page, "Devices") == str(DEVICES)
    assert metric(page, "Offline") == str(summary["presence"].get("offline", 0))
    # Degraded counts the last 5 minutes: the page and the API read it at the same moment.
    assert metric(page, "Degraded") == str(summary["degraded"])
    page.get_by_text(f"{DEVICES} devices match").wait_for()
    page.get_by_label("Device id", exact=True).fill("cam-007")
    page.keyboard.press("Enter")
    page.get_by_text("Deployment events, newest first").wait_for()
    _shot(page, "fleet")


def test_models_page_shows_both_versions(page: Any, live: tuple[Cloud, str, int]) -> None:
    """The edge model (the one with a lineage) is shown first: its two versions, and the
    threshold the INT8 version ships with, as the API has them."""
    cloud, url, _rollout = live
    _open(page, f"{url}/models", "models", "Routing calibration")
    versions = cloud.get("/v1/models/digits-edge/versions")
    page.get_by_text(f"digits-edge: {len(versions)} versions").wait_for()
    threshold = versions[-1]["routing"]["threshold"]
    page.get_by_text(f"shipped: {threshold:.4f}", exact=False).wait_for()
    int8 = versions[-1]["metrics"]
    page.get_by_text(f"INT8 {int8['accuracy']:.1%}", exact=False).wait_for()
    page.get_by_text("Lineage").first.wait_for()
    _shot(page, "models")


def test_inference_page_totals_are_the_historys(page: Any, live: tuple[Cloud, str, int]) -> None:
    cloud, url, _rollout = live
    _open(page, f"{url}/inference", "inference", "Latency percentiles")
    totals = cloud.get("/v1/history/fleet")["totals"]
    assert metric(page, "Requests") == f"{totals['requests']:,}"
    assert metric(page, "Offload rate") == f"{totals['offload_rate']:.1%}"
    assert metric(page, "p95 latency") == f"{totals['p95_ms']:.1f} ms"
    budget = cloud.get("/v1/inference/budget")
    assert budget["budget"] is None  # nothing saturates this cloud
    expected = "none in force" if budget["enabled"] else "turned off"
    assert page.get_by_text(expected, exact=False).count() == 1
    _shot(page, "inference")


def test_federated_page_shows_a_run_and_cancels_it(page: Any, live: tuple[Cloud, str, int]) -> None:
    """A run started through the API is on the page (PENDING: no device runs a SuperNode
    here); Cancel ends it, on the page and in the API."""
    cloud, url, _rollout = live
    with cloud.client() as client:
        created = client.post(
            "/v1/federated/runs",
            json={"model": "digits-edge", "rounds": 2, "selector": {"site": "lab"},
                  "wait_for_clients_s": 600},
        )  # fmt: skip
        assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    _open(page, f"{url}/federated", "federated", "No round has finished yet")
    assert metric(page, "Rounds") == "0 of 2"
    assert metric(page, "State") in ("PENDING", "RUNNING")
    _shot(page, "federated")
    page.get_by_role("button", name="Cancel run").click()
    wait_for(lambda: metric(page, "State") == "CANCELLED", 20, "CANCELLED on the page")
    assert cloud.get(f"/v1/federated/runs/{run_id}")["state"] == "CANCELLED"


def test_pause_and_abort_change_the_rollout(page: Any, live: tuple[Cloud, str, int]) -> None:
    """Pause: the page and the API say PAUSED; Abort: ABORTING (or ABORTED once every device
    that took the version is back), on the page and in the API."""
    cloud, url, rollout_id = live
    _open(page, f"{url}/rollouts", "rollouts", "Progress per wave")
    assert metric(page, "State") == "IN_PROGRESS"
    assert metric(page, "Devices") == str(DEVICES // 2)
    _shot(page, "rollouts-in-progress")
    page.get_by_role("button", name="Pause").click()
    wait_for(lambda: metric(page, "State") == "PAUSED", 20, "PAUSED on the page")
    assert cloud.get(f"/v1/rollouts/{rollout_id}")["state"] == "PAUSED"
    _shot(page, "rollouts-paused")
    page.get_by_role("button", name="Abort").click()
    wait_for(lambda: metric(page, "State") in ("ABORTING", "ABORTED"), 20, "aborted on the page")
    assert cloud.get(f"/v1/rollouts/{rollout_id}")["state"] in ("ABORTING", "ABORTED")
    assert page.get_by_role("button", name="Pause").is_disabled()
    _shot(page, "rollouts-aborted")
