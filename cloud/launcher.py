"""Run the cloud: resolve services (embedded where unset), open the context, serve the API."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import uvicorn

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.embedded.services import EmbeddedServices
from cloud.fleet.service import FleetService
from cloud.settings import CloudSettings

__all__ = ["run_cloud"]

_LOGGER = logging.getLogger(__name__)


def run_cloud(
    settings: CloudSettings,
    *,
    duration: float | None = None,
    on_ready: Callable[[CloudContext, str], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> None:
    """Serve until Ctrl-C/SIGTERM or ``duration`` seconds; every child is stopped on the way out."""
    port = settings.api_port or free_port(settings.api_host)
    with EmbeddedServices(
        data_dir=settings.data_dir,
        database_url=settings.resolved_database_url,
        mqtt_url=settings.mqtt_url,
        redis_url=settings.redis_url,
    ) as services:
        assert services.urls is not None
        context = CloudContext.open(settings, services.urls)
        fleet = FleetService(context)
        try:
            fleet.start()
            app = create_app(context, fleet)
            server = uvicorn.Server(
                uvicorn.Config(
                    app, host=settings.api_host, port=port, log_level="warning", access_log=False
                )
            )
            api_url = f"http://{settings.api_host}:{port}"
            watcher = threading.Thread(
                target=_announce_when_started,
                args=(server, context, api_url, on_ready, duration),
                daemon=True,
            )
            watcher.start()
            server.run()
        finally:
            if on_stop is not None:
                on_stop()
            fleet.stop()
            context.close()


def _announce_when_started(
    server: uvicorn.Server,
    context: CloudContext,
    api_url: str,
    on_ready: Callable[[CloudContext, str], None] | None,
    duration: float | None,
) -> None:
    while not server.started:
        if server.should_exit:
            return
        threading.Event().wait(0.05)
    if on_ready is not None:
        try:
            on_ready(context, api_url)
        except Exception:
            _LOGGER.exception("start-up hook failed; stopping")
            server.should_exit = True
            return
    if duration is not None:
        threading.Event().wait(duration)
        server.should_exit = True
