"""`edgefleet`: run the cloud, run the demo, administer models and devices."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TextIO

import typer
from pydantic import ValidationError
from rich.console import Console

from cloud import cli_compress  # noqa: F401 - adds distill, prune, fp16, report to `model`
from cloud.cli_broker import app as broker_app
from cloud.cli_dashboard import dashboard
from cloud.cli_federated import app as federated_app
from cloud.cli_models import app as models_app
from cloud.cli_rollouts import app as rollouts_app
from cloud.cli_simulate import simulate
from cloud.context import CloudContext
from cloud.demo.session import DemoSession
from cloud.embedded.dashboard import DEFAULT_PORT
from cloud.embedded.services import ServiceUrls
from cloud.launcher import OnReady, run_cloud
from cloud.roles import Role
from cloud.settings import CloudSettings
from shared.errors import EdgeFleetError

__all__ = ["OWN_LOGGERS", "app", "broker_note", "configure_logging", "main"]

app = typer.Typer(help="EdgeFleet cloud control plane.", no_args_is_help=True)
app.add_typer(models_app, name="model")
app.add_typer(broker_app, name="broker")
app.add_typer(rollouts_app, name="rollout")
app.add_typer(federated_app, name="federated")
app.command()(dashboard)
app.command()(simulate)
console = Console(soft_wrap=True)

# Our packages log at INFO (DEBUG with --verbose); everything else (httpx, alembic,
# onnxruntime's quantizer, which logs on the root logger) only from WARNING unless --verbose.
OWN_LOGGERS = ("cloud", "shared", "edge_agent", "dashboard")
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="our debug lines and third-party libraries' INFO lines too"
    ),
]
_LOGGER = logging.getLogger(__name__)


class _OurHandler(logging.StreamHandler[TextIO]):
    """Marks the handler this CLI installed, so configuring twice replaces it."""


def configure_logging(verbose: bool = False) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)


def _settings(**overrides: object) -> CloudSettings:
    try:
        return CloudSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]configuration error:[/red] {err['msg']}")
        raise typer.Exit(2) from None


def _say(message: str) -> None:
    console.print(message, highlight=False)
    sys.stdout.flush()


def broker_note(urls: ServiceUrls, settings: CloudSettings) -> str:
    """What the banner says after the broker's URL: which one, and who may use it."""
    if urls.embedded_broker == "mosquitto":
        return "  (embedded Mosquitto: per-device logins on; anonymous clients are refused)"
    if urls.embedded_broker == "rumqttd":
        return (
            "  (embedded rumqttd: this broker has NO authentication; anyone on this machine can "
            "read and publish every device's topics. Install mosquitto for per-device logins)"
        )
    if settings.broker_accounts == "dynsec":
        return "  (per-device logins provisioned at enrollment)"
    return ""


def _banner(context: CloudContext, api_url: str, role: Role = Role.ALL) -> None:
    urls = context.urls
    embedded = set(urls.embedded)
    settings = context.settings
    console.print(f"[bold green]EdgeFleet is up[/bold green] (role {role.value})")
    if role in (Role.ALL, Role.API):
        _say(f"  API        {api_url}  (docs {api_url}/docs, ready {api_url}/readyz)")
    elif role is Role.FLEET:
        _say(f"  health     {api_url}/healthz  (ready {api_url}/readyz, {api_url}/metrics)")
    if role in (Role.ALL, Role.INFERENCE):
        grpc = settings.resolved_grpc_port or "a free port (see the log line above)"
        _say(f"  inference  {api_url}/v2  (KServe v2 REST; gRPC on port {grpc})")
    _say(f"  registry   {urls.database_url}")
    _say(f"  MQTT       {urls.mqtt_url}{broker_note(urls, settings)}")
    _say(f"  Redis      {urls.redis_url}{'  (embedded)' if 'redis' in embedded else ''}")
    _say(f"  artifacts  {settings.artifact_dir.resolve()}")
    _say(f"  logs       {(settings.data_dir / 'logs').resolve()}")
    if settings.dev_mode:
        _say(f"  admin token (dev mode) {settings.admin_token}")


def _serve_banner(role: Role) -> OnReady:
    def banner(context: CloudContext, api_url: str, _stop: threading.Event) -> None:
        _banner(context, api_url, role)
        _say("Ctrl-C stops everything.")

    return banner


def _run_until_stopped(
    settings: CloudSettings,
    duration: float | None,
    on_ready: OnReady | None = None,
    on_stop: Callable[[], None] | None = None,
    on_tick: Callable[[], None] | None = None,
    role: Role = Role.ALL,
) -> None:
    """Run the cloud; whatever ends it, say so in one line, never with a traceback (that
    goes to the log at DEBUG, shown with --verbose)."""
    _say(f"Starting EdgeFleet (data in {settings.data_dir.resolve()})")
    try:
        run_cloud(
            settings,
            duration=duration,
            on_ready=on_ready or _serve_banner(role),
            on_stop=on_stop,
            on_tick=on_tick,
            role=role,
        )
    except KeyboardInterrupt:
        # A second Ctrl-C: each stop step still ran, but some were cut short.
        _LOGGER.debug("interrupted", exc_info=True)
        console.print(
            "[yellow]EdgeFleet interrupted:[/yellow] stopped without waiting for every step "
            f"to finish; see {(settings.data_dir / 'logs').resolve()}",
            highlight=False,
        )
        raise typer.Exit(130) from None
    except EdgeFleetError as exc:
        _LOGGER.debug("stopped", exc_info=True)
        console.print(f"[red]EdgeFleet stopped:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:
        _LOGGER.debug("stopped by an unexpected error", exc_info=True)
        console.print(
            f"[red]EdgeFleet stopped by an unexpected error:[/red] {type(exc).__name__}: {exc} "
            "(--verbose shows where)",
            highlight=False,
        )
        raise typer.Exit(1) from None
    _say("EdgeFleet stopped; every child process is gone.")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="API port (0 picks a free one)")] = None,
    host: Annotated[str | None, typer.Option(help="API bind address")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the registry and artifacts live")
    ] = None,
    role: Annotated[
        Role,
        typer.Option(
            help="api: control-plane REST + fleet service; fleet: fleet service (health and "
            "metrics over HTTP); inference: KServe v2 REST + gRPC; all: everything"
        ),
    ] = Role.ALL,
    grpc_port: Annotated[
        int | None, typer.Option(help="KServe v2 gRPC port (default: API port + 1)")
    ] = None,
    verbose: VerboseOption = False,
) -> None:
    """Run the cloud (or one role of it) with the configured (or embedded) services."""
    configure_logging(verbose)
    settings = _settings(api_port=port, api_host=host, data_dir=data_dir, grpc_port=grpc_port)
    _run_until_stopped(settings, None, role=role)


@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="stop after N seconds")] = None,
    port: Annotated[int, typer.Option(help="API port (0 picks a free one)")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="demo data directory")] = Path(".edgefleet/demo"),
    agents: Annotated[int, typer.Option(help="local edge agents to run", min=0, max=50)] = 2,
    traffic: Annotated[
        float, typer.Option(help="digits per second sent to the agents (0: none)", min=0, max=1000)
    ] = 20.0,
    dashboard_port: Annotated[
        int, typer.Option(help="dashboard port (taken or 0: a free one); -1: no dashboard")
    ] = DEFAULT_PORT,
    federated: Annotated[
        bool, typer.Option(help="run one federated round on the agents with drifted data")
    ] = False,
    sim_agents: Annotated[
        int,
        typer.Option(help="simulated devices the INT8 model is rolled out to (0: none)", min=0),
    ] = 20,
    verbose: VerboseOption = False,
) -> None:
    """Start the embedded services, the cloud API in dev mode, the reference models and N
    local `edge-agent` processes running the INT8 edge model; Ctrl-C stops all."""
    configure_logging(verbose)
    settings = _settings(dev_mode=True, api_port=port, data_dir=data_dir)
    session = DemoSession(
        agents,
        say=_say,
        banner=_banner,
        traffic=traffic,
        dashboard_port=None if dashboard_port < 0 else dashboard_port,
        federated=federated,
        sim_agents=sim_agents,
    )
    _run_until_stopped(
        settings, duration, on_ready=session.ready, on_stop=session.stop, on_tick=session.tick
    )


def main() -> None:
    configure_logging()
    app()
