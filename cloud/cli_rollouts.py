"""`edgefleet rollout …`: start, follow and steer rollouts (and undeploys) over the REST API."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from types import FrameType
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from cloud.cli_models import DEFAULT_API, ApiOption, TokenOption
from cloud.cli_rollout_view import STYLES, goal, render, state_counts, summary
from cloud.settings import DEV_ADMIN_TOKEN

__all__ = ["EXIT_ABORTED", "EXIT_SUPERSEDED", "app"]

app = typer.Typer(
    help="Roll a model version (or its removal) out to the fleet in waves, and follow it.",
    no_args_is_help=True,
)
console = Console()

# What `watch` ends with, besides 0 for COMPLETED (1: the API refused, 2: unreachable).
EXIT_ABORTED = 3
EXIT_SUPERSEDED = 4
EXIT_INTERRUPTED = 130
_END_CODES = {"COMPLETED": 0, "ABORTED": EXIT_ABORTED, "SUPERSEDED": EXIT_SUPERSEDED}

LabelOption = Annotated[
    list[str] | None,
    typer.Option("--label", "-l", help="only devices with this label, KEY=VALUE (repeatable)"),
]
CanaryOption = Annotated[int | None, typer.Option(help="canary devices (default 1)")]
CanaryPercentOption = Annotated[
    float | None, typer.Option(help="canary as a percentage of the devices (instead)")
]
GrowthOption = Annotated[float | None, typer.Option(help="each wave this many times the last")]
SuccessOption = Annotated[
    float | None, typer.Option(help="share of a wave that must succeed to open the next (0-1)")
]
FailureOption = Annotated[
    float | None, typer.Option(help="share of finished devices failed that aborts (0-1)")
]
MinFailuresOption = Annotated[int | None, typer.Option(help="failures before an abort may happen")]
TimeoutOption = Annotated[
    float | None, typer.Option("--device-timeout", help="seconds a device has before it failed")
]
RateOption = Annotated[int | None, typer.Option("--max-per-minute", help="devices sent a minute")]
WatchOption = Annotated[bool, typer.Option("--watch", "-w", help="follow it live until it ends")]
IntervalOption = Annotated[float, typer.Option(help="seconds between refreshes", min=0.1)]


class _ApiError(Exception):
    """What the API said (or that it could not be reached), as one line, and the exit code."""

    def __init__(self, line: str, code: int) -> None:
        super().__init__(line)
        self.line, self.code = line, code


class _Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self._client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(30, connect=5),
        )

    def __call__(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise _ApiError(f"cannot reach the cloud API at {self.url}: {exc}", 2) from None
        if response.is_success:
            return response.json()
        try:
            message = response.json().get("error", response.text)
        except (ValueError, AttributeError):
            message = response.text
        raise _ApiError(f"error {response.status_code}: {message}", 1)

    def close(self) -> None:
        self._client.close()


@contextmanager
def _api(url: str, token: str) -> Iterator[_Api]:
    """The API client; whatever it raises leaves as one red line and an exit code."""
    api = _Api(url, token)
    try:
        yield api
    except _ApiError as exc:
        console.print(Text(exc.line, style="red"), soft_wrap=True)
        raise typer.Exit(exc.code) from None
    finally:
        api.close()


def _selector(labels: list[str] | None) -> dict[str, str]:
    selector: dict[str, str] = {}
    for item in labels or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        selector[key] = value
    return selector


def _given(**given: Any) -> dict[str, Any]:
    """Only what was given: the API's defaults decide the rest."""
    return {key: value for key, value in given.items() if value is not None}


# -- watching --------------------------------------------------------------------------


@contextmanager
def _ctrl_c() -> Iterator[threading.Event]:
    """Ctrl-C as a flag the watch loop checks rather than an exception: raised anywhere, it
    may land inside rich's rendering and leave its output buffered for good. A second Ctrl-C
    interrupts at once (the default handler is back after the first)."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed  # signal handlers belong to the main thread
        return

    def on_sigint(_signum: int, _frame: FrameType | None) -> None:
        pressed.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _follow(api: _Api, rollout: dict[str, Any], interval: float, stop: threading.Event) -> Any:
    """Refresh the live view until the rollout ends or ``stop`` is set; the last rollout seen.
    An API that stops answering mid-way is shown and tried again (the rollout goes on without
    us); one that refuses the rollout (404, 401) ends the watch."""
    path = f"/v1/rollouts/{rollout['id']}"
    with Live(render(rollout), console=console, auto_refresh=False) as live:
        while rollout["state"] not in _END_CODES and not stop.wait(interval):
            try:
                rollout, trouble = api("GET", path), None
            except _ApiError as exc:
                if exc.code != 2:
                    raise
                trouble = f"{exc.line}; trying again"
            stamp = datetime.now().strftime("%H:%M:%S")
            live.update(render(rollout, trouble or f"updated {stamp}"), refresh=True)
    if not console.is_terminal:
        console.line()  # a file or pipe got the last view without its line end
    return rollout


def _watch(api: _Api, rollout_id: int, interval: float) -> int:
    """Follow the rollout until it ends; its exit code. Ctrl-C only stops the watching."""
    rollout = api("GET", f"/v1/rollouts/{rollout_id}")
    with _ctrl_c() as pressed:
        console.print(f"watching rollout {rollout_id} (Ctrl-C stops watching; the rollout goes on)")
        try:
            rollout = _follow(api, rollout, interval, pressed)
        except KeyboardInterrupt:
            pressed.set()
    if pressed.is_set():
        console.print(
            f"[yellow]stopped watching:[/yellow] rollout {rollout_id} goes on "
            f"({rollout['state']}); `edgefleet rollout watch {rollout_id}` follows it again, "
            f"`edgefleet rollout abort {rollout_id}` stops it",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_INTERRUPTED
    console.print(summary(rollout), highlight=False, soft_wrap=True)
    return _END_CODES[rollout["state"]]


def _started(api: _Api, body: dict[str, Any], watch: bool, interval: float) -> None:
    rollout = api("POST", "/v1/rollouts", json=body)
    sizes = ", ".join(str(w["devices"]) for w in rollout["progress"])
    console.print(
        f"rollout {rollout['id']} started: {goal(rollout)} on {rollout['devices']} devices "
        f"in {rollout['waves']} waves ({sizes})",
        highlight=False,
        soft_wrap=True,
    )
    if watch:
        raise typer.Exit(_watch(api, rollout["id"], interval))


# -- commands --------------------------------------------------------------------------


@app.command()
def start(
    model: str,
    version: int,
    label: LabelOption = None,
    canary: CanaryOption = None,
    canary_percent: CanaryPercentOption = None,
    growth: GrowthOption = None,
    success_threshold: SuccessOption = None,
    failure_threshold: FailureOption = None,
    min_failures: MinFailuresOption = None,
    device_timeout: TimeoutOption = None,
    max_per_minute: RateOption = None,
    watch: WatchOption = False,
    interval: IntervalOption = 1.0,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Roll MODEL:VERSION out to the devices with the given labels, canary first."""
    strategy = _given(
        canary=canary, canary_percent=canary_percent, growth=growth,
        success_threshold=success_threshold, failure_threshold=failure_threshold,
        min_failures=min_failures, device_timeout_s=device_timeout,
        max_devices_per_minute=max_per_minute,
    )  # fmt: skip
    body = {"model": model, "version": version, "selector": _selector(label), "strategy": strategy}
    with _api(api, token) as client:
        _started(client, body, watch, interval)


@app.command()
def undeploy(
    model: str,
    label: LabelOption = None,
    canary: CanaryOption = None,
    canary_percent: CanaryPercentOption = None,
    growth: GrowthOption = None,
    success_threshold: SuccessOption = None,
    failure_threshold: FailureOption = None,
    min_failures: MinFailuresOption = None,
    device_timeout: TimeoutOption = None,
    max_per_minute: RateOption = None,
    watch: WatchOption = False,
    interval: IntervalOption = 1.0,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Take MODEL off the devices with the given labels, in waves (abort puts it back)."""
    strategy = _given(
        canary=canary, canary_percent=canary_percent, growth=growth,
        success_threshold=success_threshold, failure_threshold=failure_threshold,
        min_failures=min_failures, device_timeout_s=device_timeout,
        max_devices_per_minute=max_per_minute,
    )  # fmt: skip
    body = {"model": model, "undeploy": True, "selector": _selector(label), "strategy": strategy}
    with _api(api, token) as client:
        _started(client, body, watch, interval)


@app.command()
def watch(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    interval: IntervalOption = 1.0,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Follow a rollout live until it ends: exit 0 COMPLETED, 3 ABORTED, 4 SUPERSEDED."""
    with _api(api, token) as client:
        code = _watch(client, rollout_id, interval)
    raise typer.Exit(code)


@app.command("list")
def list_rollouts(
    state: Annotated[str | None, typer.Option(help="only rollouts in this state")] = None,
    model: Annotated[str | None, typer.Option(help="only this model's rollouts")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """The latest rollouts, newest first."""
    params = _given(state=state, model=model, limit=limit)
    with _api(api, token) as client:
        rollouts = client("GET", "/v1/rollouts", params=params)
    table = Table("id", "goal", "state", "wave", "devices", "reason")
    for r in rollouts:
        wave = f"{max(r['current_wave'], 0) + 1}/{r['waves']}" if r["waves"] else ""
        table.add_row(
            str(r["id"]), goal(r), Text(r["state"], style=STYLES.get(r["state"], "")), wave,
            state_counts(r["states"]), r["reason"] or "",
        )  # fmt: skip
    console.print(table)


@app.command()
def show(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """A rollout's progress by wave, and the devices that failed, with their reasons."""
    with _api(api, token) as client:
        rollout = client("GET", f"/v1/rollouts/{rollout_id}")
        failed = [
            target
            for state in ("FAILED", "REVERT_FAILED")
            for target in client(
                "GET", f"/v1/rollouts/{rollout_id}/targets", params={"state": state, "limit": 20}
            )["items"]
        ]
    console.print(render(rollout, f"created by {rollout['created_by']} at {rollout['created_at']}"))
    if failed:
        table = Table("device", "wave", "state", "reason", title="failed devices (first 20)")
        for t in failed:
            table.add_row(t["device_id"], str(t["wave"] + 1), t["state"], t["reason"] or "")
        console.print(table)


def _command(action: str, rollout_id: int, api: str, token: str) -> None:
    with _api(api, token) as client:
        rollout = client("POST", f"/v1/rollouts/{rollout_id}/{action}")
    console.print(summary(rollout), highlight=False, soft_wrap=True)


@app.command()
def pause(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Send no device anything new until resumed (reports are still recorded)."""
    _command("pause", rollout_id, api, token)


@app.command()
def resume(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Carry a paused rollout on."""
    _command("resume", rollout_id, api, token)


@app.command()
def abort(
    rollout_id: Annotated[int, typer.Argument(metavar="ID")],
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Stop it: every device it changed goes back to what it ran before (and confirms)."""
    _command("abort", rollout_id, api, token)
