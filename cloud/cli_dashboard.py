"""`edgefleet dashboard`: the Streamlit dashboard over a running cloud's REST API, until
Ctrl-C (or SIGTERM, SIGHUP), which stops it and leaves no process behind."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cloud.embedded.dashboard import DEFAULT_PORT, DashboardProcess
from cloud.embedded.processes import port_open
from cloud.launcher import stop_on_signals
from shared.errors import EdgeFleetError

__all__ = ["dashboard"]

console = Console(soft_wrap=True)


def _token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            source = sys.stdin if str(token_file) == "-" else token_file.open()
            with source:
                token = source.readline().strip()
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {token_file}: {exc.strerror}") from None
        if not token:
            raise typer.BadParameter(f"{token_file} holds no token")
        return token
    token = os.environ.get("EDGEFLEET_DASHBOARD_TOKEN") or os.environ.get("EDGEFLEET_ADMIN_TOKEN")
    if not token:
        raise typer.BadParameter(
            "no admin token: give --token-file, or set EDGEFLEET_DASHBOARD_TOKEN "
            "(or EDGEFLEET_ADMIN_TOKEN)",
            param_hint="--token-file",
        )
    return token


def dashboard(
    api_url: Annotated[
        str,
        typer.Option(
            envvar="EDGEFLEET_DASHBOARD_API_URL", help="the cloud API the dashboard reads"
        ),
    ] = "http://127.0.0.1:8000",
    port: Annotated[int, typer.Option(help="dashboard port (0 picks a free one)")] = DEFAULT_PORT,
    host: Annotated[str, typer.Option(help="dashboard bind address")] = "127.0.0.1",
    token_file: Annotated[
        Path | None,
        typer.Option(help="a file holding the admin token ('-': standard input)"),
    ] = None,
    log_file: Annotated[
        Path | None, typer.Option(help="where Streamlit logs (default: nowhere)")
    ] = None,
) -> None:
    """Run the dashboard (Streamlit) over the cloud API; the admin token comes from
    --token-file, EDGEFLEET_DASHBOARD_TOKEN or EDGEFLEET_ADMIN_TOKEN."""
    token = _token(token_file)
    if port and port_open(host, port):
        raise typer.BadParameter(
            f"{host}:{port} is taken; choose another --port", param_hint="--port"
        )
    try:
        process = DashboardProcess(
            api_url=api_url, token=token, host=host, port=port, log_path=log_file, fallback=False
        )
        stop = threading.Event()
        with stop_on_signals(stop):
            process.start()
            try:
                console.print(
                    f"[bold green]Dashboard[/bold green] {process.url}  (reading {api_url}); "
                    "Ctrl-C stops it.",
                    highlight=False,
                )
                sys.stdout.flush()
                while not stop.wait(1.0):
                    if (code := process.exit_code()) is not None:
                        raise EdgeFleetError(f"the dashboard exited (code {code})")
            finally:
                process.stop()
    except EdgeFleetError as exc:
        console.print(f"[red]Dashboard stopped:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    console.print("Dashboard stopped.", highlight=False)
