"""Run the cloud: resolve services (embedded where unset), open the context, serve the API,
and stop everything in order (hooks, API, fleet loops, then the child services)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import uvicorn

from cloud.api.server import JsonH11Protocol
from cloud.context import CloudContext
from cloud.embedded.mosquitto import BrokerLogin
from cloud.embedded.processes import free_port, run_all
from cloud.embedded.services import EmbeddedServices
from cloud.roles import Role, build_role
from cloud.settings import CloudSettings
from shared.errors import ServiceUnavailable

__all__ = ["OnReady", "Role", "on_embedded_broker", "run_cloud", "stop_on_signals"]

_LOGGER = logging.getLogger(__name__)

# Called on the main thread once the API answers: (context, API URL, the stop event).
OnReady = Callable[[CloudContext, str, threading.Event], None]
_API_START_TIMEOUT_S = 30.0
_API_STOP_TIMEOUT_S = 15.0
_WATCH_INTERVAL_S = 1.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM/SIGHUP set ``stop``; a second SIGINT raises KeyboardInterrupt (the
    stop steps each still run, see ``run_all``). Main thread only.

    ``stop`` is set by a thread of its own that reads the signals from Python's wakeup fd,
    never by the handler: the handler runs on the main thread between two bytecodes, maybe
    while that thread holds ``stop``'s own lock inside ``stop.wait()`` (setting it there
    deadlocks), and a signal that lands on another thread would not wake a main thread
    blocked in ``stop.wait()`` at all; the wakeup fd is written whichever thread it lands on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    reader = threading.Thread(
        target=_set_on_signals, args=(read_end, stop), name="signals", daemon=True
    )

    interrupts = 0

    def handle(sig: int, _frame: FrameType | None) -> None:
        # Counted here, not read from ``stop``: the reader may set it for this very signal
        # before this handler runs.
        nonlocal interrupts
        if sig == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                raise KeyboardInterrupt

    reader.start()
    previous_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    previous = {sig: signal.signal(sig, handle) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(previous_fd)
        os.write(write_end, b"\0")  # after any signal still in the pipe: the reader's end
        reader.join()
        os.close(write_end)
        os.close(read_end)


def _set_on_signals(read_end: int, stop: threading.Event) -> None:
    while True:
        for number in os.read(read_end, 64):
            if number == 0:
                return
            if number in _STOP_SIGNALS:
                _LOGGER.info("%s received: stopping", signal.Signals(number).name)
                stop.set()


class _Watch:
    """Every second, from a thread of its own: is each embedded service still running (if
    not, say which and set ``stop``), and ``on_tick`` (the demo looks at its agents)."""

    def __init__(
        self,
        services: EmbeddedServices,
        stop: threading.Event,
        on_tick: Callable[[], None] | None,
    ) -> None:
        self.services = services
        self.stop = stop
        self.on_tick = on_tick
        self.failure: str | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check(self) -> str | None:
        """What died, if a service did (remembered once seen)."""
        if self.failure is None:
            self.failure = self.services.died()
        return self.failure

    def _run(self) -> None:
        while not self._closed.wait(_WATCH_INTERVAL_S):
            try:
                failure = self.check()
                if failure is not None:
                    _LOGGER.warning("%s: stopping everything", failure)
                    self.stop.set()
                    return
                if self.on_tick is not None:
                    self.on_tick()
            except Exception as exc:
                # Watching must go on: one bad look is a line in the log, not the end.
                _LOGGER.error("watching the child processes: %s", exc)
                _LOGGER.debug("watching the child processes", exc_info=True)

    def close(self) -> None:
        """Stop watching: from here on, children stop because we stop them."""
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join()


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
    on_tick: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
    role: Role = Role.ALL,
) -> None:
    """Serve ``role`` (see ``cloud.roles``) until SIGINT/SIGTERM/SIGHUP, ``stop``,
    ``duration`` seconds, or the death of an embedded service (then raise ServiceUnavailable,
    saying which one and where its log is, once everything else has stopped in order).
    ``on_tick`` is called about every second.

    The shutdown order is what keeps it clean: ``on_stop`` (the demo's agents), the API,
    gRPC and the inference sessions, the fleet service's loops, the context, and only then
    the embedded broker and Redis.
    The children run in sessions of their own, so a terminal's Ctrl-C does not reach them
    before everything that uses them has stopped. Each step runs even if an earlier one
    failed or was interrupted by a second Ctrl-C (which then ends in KeyboardInterrupt).
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
                watch = _Watch(services, stop, on_tick)
                _serve(context, role, port, watch, duration, on_ready, on_stop)
            finally:
                context.close()


def _serve(
    context: CloudContext,
    role: Role,
    port: int,
    watch: _Watch,
    duration: float | None,
    on_ready: OnReady | None,
    on_stop: Callable[[], None] | None,
) -> None:
    settings = context.settings
    stop = watch.stop
    parts = build_role(context, role)
    api: list[tuple[uvicorn.Server, threading.Thread]] = []
    steps: list[tuple[str, Callable[[], None]]] = [("watching the children", watch.close)]
    if on_stop is not None:
        steps.append(("stopping the demo", on_stop))
    steps += [("stopping the API", lambda: _stop_api(api)), *parts.stop_steps()]
    try:
        watch.start()
        parts.start()
        server = uvicorn.Server(
            uvicorn.Config(
                parts.app,
                host=settings.api_host,
                port=port,
                # uvicorn's own lines follow the root logger: shown with --verbose only.
                log_level="info" if logging.getLogger().isEnabledFor(logging.INFO) else "warning",
                access_log=False,
                timeout_graceful_shutdown=5,
                http=JsonH11Protocol,  # JSON errors and a bounded head, see cloud.api.server
                ws="none",  # no WebSocket routes: an upgrade is a request like any other
            )
        )
        # Off the main thread, uvicorn installs no signal handlers: ours decide the order.
        thread = threading.Thread(target=server.run, name="api", daemon=True)
        api.append((server, thread))
        thread.start()
        if _wait_started(server, thread, stop):
            if on_ready is not None:
                on_ready(context, f"http://{settings.api_host}:{port}", stop)
            stop.wait(duration)  # set by a signal, or by the watch when a service died
    except Exception as exc:
        # What failed may be a consequence (Redis gone, say): the dead service is the cause.
        failure = watch.check()
        with contextlib.suppress(Exception):  # the error in flight says more; ^C still goes
            run_all(steps)
        if failure is not None:
            raise ServiceUnavailable(failure) from exc
        raise
    except BaseException:
        with contextlib.suppress(Exception):
            run_all(steps)
        raise
    run_all(steps)
    if watch.failure is not None:
        raise ServiceUnavailable(watch.failure)


def _stop_api(api: list[tuple[uvicorn.Server, threading.Thread]]) -> None:
    for server, thread in api:
        server.should_exit = True
        thread.join(_API_STOP_TIMEOUT_S)
        if thread.is_alive():
            _LOGGER.warning(
                "the API did not stop within %gs; leaving it behind", _API_STOP_TIMEOUT_S
            )


def _wait_started(server: uvicorn.Server, thread: threading.Thread, stop: threading.Event) -> bool:
    """True once the API serves; False if asked to stop first."""
    deadline = time.monotonic() + _API_START_TIMEOUT_S
    while not server.started:
        if stop.is_set():
            return False
        if not thread.is_alive():
            raise ServiceUnavailable(
                f"the API could not start on {server.config.host}:{server.config.port}"
            )
        if time.monotonic() > deadline:
            raise ServiceUnavailable(f"the API did not start within {_API_START_TIMEOUT_S:g}s")
        stop.wait(0.05)
    return True
