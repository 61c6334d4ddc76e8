"""Run the cloud: resolve services (embedded where unset), open the context, serve the API,
and stop everything in order (hooks, API, fleet loops, then the child services)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from cloud.api.app import create_app
from cloud.api.server import JsonH11Protocol
from cloud.context import CloudContext
from cloud.embedded.mosquitto import BrokerLogin
from cloud.embedded.processes import free_port
from cloud.embedded.services import EmbeddedServices
from cloud.fleet.service import FleetService
from cloud.settings import CloudSettings
from shared.errors import ServiceUnavailable

__all__ = ["OnReady", "on_embedded_broker", "run_cloud", "stop_on_signals"]

_LOGGER = logging.getLogger(__name__)

# Called on the main thread once the API answers: (context, API URL, the stop event).
OnReady = Callable[[CloudContext, str, threading.Event], None]
_API_START_TIMEOUT_S = 30.0
_API_STOP_TIMEOUT_S = 15.0


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM set ``stop`` (a second SIGINT interrupts as usual); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(sig: int, _frame: FrameType | None) -> None:
        if sig == signal.SIGINT and stop.is_set():
            raise KeyboardInterrupt
        _LOGGER.info("%s received: stopping", signal.Signals(sig).name)
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def on_embedded_broker(settings: CloudSettings, login: BrokerLogin | None) -> CloudSettings:
    """The settings the cloud runs with: on an embedded Mosquitto, its own login there, and
    device logins provisioned through its dynamic security at enrollment."""
    if login is None:
        return settings
    return settings.model_copy(
        update={
            "broker_accounts": "dynsec",
            "mqtt_username": login.username,
            "mqtt_password": login.password,
        }
    )


def run_cloud(
    settings: CloudSettings,
    *,
    duration: float | None = None,
    on_ready: OnReady | None = None,
    on_stop: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM, ``stop`` or ``duration`` seconds.

    The shutdown order is what keeps it clean: ``on_stop`` (the demo's agents), the API,
    the fleet service's loops, the context, and only then the embedded broker and Redis.
    The children run in sessions of their own, so a terminal's Ctrl-C does not reach them
    before everything that uses them has stopped.
    """
    stop = stop or threading.Event()
    with stop_on_signals(stop):
        port = settings.api_port or free_port(settings.api_host)
        with EmbeddedServices(
            data_dir=settings.data_dir,
            database_url=settings.resolved_database_url,
            mqtt_url=settings.mqtt_url,
            redis_url=settings.redis_url,
            broker=settings.embedded_broker,
        ) as services:
            assert services.urls is not None
            context = CloudContext.open(
                on_embedded_broker(settings, services.broker_login), services.urls
            )
            try:
                _serve(context, port, duration, on_ready, on_stop, stop)
            finally:
                context.close()


def _serve(
    context: CloudContext,
    port: int,
    duration: float | None,
    on_ready: OnReady | None,
    on_stop: Callable[[], None] | None,
    stop: threading.Event,
) -> None:
    settings = context.settings
    fleet = FleetService(context)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    try:
        fleet.start()
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(context, fleet),
                host=settings.api_host,
                port=port,
                # uvicorn's own lines follow the root logger: shown with --verbose only.
                log_level="info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning",
                access_log=False,
                timeout_graceful_shutdown=5,
                http=JsonH11Protocol,  # JSON errors and a bounded head, see cloud.api.server
            )
        )
        # Off the main thread, uvicorn installs no signal handlers: ours decide the order.
        thread = threading.Thread(target=server.run, name="api", daemon=True)
        thread.start()
        if _wait_started(server, thread, stop):
            if on_ready is not None:
                on_ready(context, f"http://{settings.api_host}:{port}", stop)
            stop.wait(duration)
    finally:
        try:
            if on_stop is not None:
                on_stop()
        finally:
            if server is not None and thread is not None:
                server.should_exit = True
                thread.join(_API_STOP_TIMEOUT_S)
            fleet.stop()


def _wait_started(server: uvicorn.Server, thread: threading.Thread, stop: threading.Event) -> bool:
    """True once the API serves; False if asked to stop first."""
    waited = 0.0
    while not server.started:
        if stop.is_set():
            return False
        if not thread.is_alive():
            raise ServiceUnavailable(
                f"the API could not start on {server.config.host}:{server.config.port}"
            )
        if waited > _API_START_TIMEOUT_S:
            raise ServiceUnavailable(f"the API did not start within {_API_START_TIMEOUT_S:g}s")
        stop.wait(0.05)
        waited += 0.05
    return True
