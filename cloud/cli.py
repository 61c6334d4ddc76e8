"""`edgefleet`: run the cloud, run the demo, administer models and devices."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from cloud.cli_models import app as models_app
from cloud.context import CloudContext
from cloud.demo_fleet import DemoFleet
from cloud.launcher import run_cloud
from cloud.pipeline.reference.build import register_reference
from cloud.settings import CloudSettings

__all__ = ["app", "main"]

app = typer.Typer(help="EdgeFleet cloud control plane.", no_args_is_help=True)
app.add_typer(models_app, name="model")
console = Console(soft_wrap=True)


def _settings(**overrides: object) -> CloudSettings:
    try:
        return CloudSettings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        for err in exc.errors():
            console.print(f"[red]configuration error:[/red] {err['msg']}")
        raise typer.Exit(2) from None


def _banner(context: CloudContext, api_url: str) -> None:
    urls = context.urls
    console.print("[bold green]EdgeFleet is up[/bold green]")
    console.print(f"  API        {api_url}  (docs {api_url}/docs, ready {api_url}/readyz)")
    console.print(f"  registry   {urls.database_url}")
    embedded = set(urls.embedded)
    console.print(f"  MQTT       {urls.mqtt_url}{'  (embedded)' if 'mqtt' in embedded else ''}")
    console.print(f"  Redis      {urls.redis_url}{'  (embedded)' if 'redis' in embedded else ''}")
    console.print(f"  artifacts  {context.settings.artifact_dir.resolve()}")
    if context.settings.dev_mode:
        console.print(f"  admin token (dev mode) {context.settings.admin_token}")
    console.print("Ctrl-C stops everything.", highlight=False)
    sys.stdout.flush()


class _Demo:
    """What `edgefleet demo` adds once the API is up: reference models, then local agents."""

    def __init__(self, agents: int) -> None:
        self.count = agents
        self.fleet: DemoFleet | None = None

    def ready(self, context: CloudContext, api_url: str) -> None:
        _banner(context, api_url)
        names = ["digits-cloud", "digits-edge", "digits-edge-weak"]
        added = register_reference(
            context,
            names=names,
            actor="demo",
            progress=lambda msg: console.print(f"  [dim]{msg}[/dim]"),
        )
        if added:
            console.print("Registered " + ", ".join(f"{m}:{v}" for m, v in added))
        if self.count:
            self.fleet = DemoFleet(context, api_url, self.count)
            for line in self.fleet.start():
                console.print(f"  agent {line}")
        sys.stdout.flush()

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()


def _run_until_stopped(
    settings: CloudSettings,
    duration: float | None,
    on_ready: Callable[[CloudContext, str], None] = _banner,
    on_stop: Callable[[], None] | None = None,
) -> None:
    # uvicorn re-raises Ctrl-C once it has shut down; by then every child is stopped.
    with contextlib.suppress(KeyboardInterrupt):
        run_cloud(settings, duration=duration, on_ready=on_ready, on_stop=on_stop)
    console.print("EdgeFleet stopped; every child process is gone.")


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="API port (0 picks a free one)")] = None,
    host: Annotated[str | None, typer.Option(help="API bind address")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the registry and artifacts live")
    ] = None,
) -> None:
    """Run the cloud API with the configured (or embedded) services."""
    settings = _settings(api_port=port, api_host=host, data_dir=data_dir)
    _run_until_stopped(settings, None)


@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="stop after N seconds")] = None,
    port: Annotated[int, typer.Option(help="API port (0 picks a free one)")] = 8000,
    data_dir: Annotated[Path, typer.Option(help="demo data directory")] = Path(".edgefleet/demo"),
    agents: Annotated[int, typer.Option(help="local edge agents to run", min=0, max=50)] = 2,
) -> None:
    """Start the embedded services, the cloud API in dev mode, the reference models and N
    local agents running the INT8 edge model; Ctrl-C stops all."""
    settings = _settings(dev_mode=True, api_port=port, data_dir=data_dir)
    demo_run = _Demo(agents)
    _run_until_stopped(settings, duration, on_ready=demo_run.ready, on_stop=demo_run.stop)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app()
