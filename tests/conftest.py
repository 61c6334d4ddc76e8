"""Fixtures: real registry databases, real embedded services, a real uvicorn server."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.embedded.services import EmbeddedServices, ServiceUrls
from cloud.registry.database import Database
from cloud.settings import CloudSettings
from tests.services import POSTGRES, need

ADMIN_TOKEN = "test-admin-token-0123456789"

# Modules whose every test talks to the machine's Mosquitto (1883).
_MACHINE_BROKER_MODULES = {
    "tests.edge_agent.test_delivery",
    "tests.integration.test_carousel_patience",
    "tests.cloud.test_services",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`-n N --dist loadgroup`, as `make test` runs): a file's tests stay
    on one worker, so its module fixtures (a populated cloud, a browser) are set up once; and
    every test on the machine's Mosquitto runs on one worker, since clouds there share
    retained topics (the budget) and chunk topics (the same reference artifacts)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        group = item.nodeid.split("::", 1)[0]
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        on_machine_broker = params.get("broker_url") == "mosquitto"
        module = getattr(item, "module", None)
        if on_machine_broker or getattr(module, "__name__", "") in _MACHINE_BROKER_MODULES:
            group = "machine-mosquitto"
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceUrls]:
    """One embedded broker and Redis (real child processes) for the whole session; rumqttd,
    which has no logins, so tests may publish as any client."""
    with EmbeddedServices(
        data_dir=tmp_path_factory.mktemp("embedded"),
        database_url="sqlite://",
        mqtt_url=None,
        redis_url=None,
        broker="rumqttd",
    ) as services:
        assert services.urls is not None
        yield services.urls


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped after the session."""
    need(POSTGRES)
    name = f"edgefleet_test_{uuid.uuid4().hex[:10]}"
    admin = "postgresql://postgres@127.0.0.1:5432/test"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _reset_postgres(url: str) -> None:
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same contract, run on each registry backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    url: str = request.getfixturevalue("postgres_server_url")
    _reset_postgres(url)
    return url


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def settings(tmp_path: Path) -> CloudSettings:
    return CloudSettings(
        data_dir=tmp_path / "cloud",
        admin_token=ADMIN_TOKEN,
        max_upload_bytes=2 * 1024 * 1024,
        max_request_bytes=256 * 1024,
        chunk_size=4096,
    )


@pytest.fixture
def context(settings: CloudSettings, embedded: ServiceUrls) -> Iterator[CloudContext]:
    urls = ServiceUrls(settings.resolved_database_url, embedded.mqtt_url, embedded.redis_url)
    ctx = CloudContext.open(settings, urls)
    # The session's embedded Redis is this worker's alone: start every test from an empty one,
    # so no test reads what another left (live views, locks, cached documents).
    ctx.redis.flushdb()
    yield ctx
    ctx.close()


@dataclass
class RunningApi:
    url: str
    context: CloudContext

    def client(self, token: str | None = ADMIN_TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Registering the reference models (quantize, calibrate, gate) takes seconds on a
        # quiet machine and tens of them on a loaded one: a request is given two minutes.
        return httpx.Client(base_url=self.url, headers=headers, timeout=120)


@contextmanager
def serve_in_thread(app: object) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def api(context: CloudContext) -> Iterator[RunningApi]:
    """The cloud API served by a real uvicorn on a free port."""
    with serve_in_thread(create_app(context)) as url:
        yield RunningApi(url, context)


@pytest.fixture(scope="session")
def reference_onnx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The digits reference models, built once per session (a few seconds)."""
    from cloud.pipeline.reference import digits

    splits = digits.digits_splits(0)
    return {
        "digits-edge": digits.build_edge(splits),
        "digits-edge-weak": digits.build_weak_edge(splits),
        "digits-cloud": digits.build_cloud(splits),
    }


def seed_reference_cache(settings: CloudSettings, models: dict[str, bytes]) -> None:
    """Put prebuilt reference models where the pipeline caches them."""
    cache = settings.data_dir / "reference"
    cache.mkdir(parents=True, exist_ok=True)
    for name, data in models.items():
        (cache / f"{name}.onnx").write_bytes(data)
