"""`edgefleet broker …`: set up Mosquitto's dynamic-security file for EdgeFleet."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cloud.broker.setup import DEFAULT_CLOUD_USERNAME, new_password, write_dynsec_config
from shared.errors import Conflict

__all__ = ["app"]

app = typer.Typer(help="Set up the MQTT broker's logins (Mosquitto dynamic security).")
console = Console(soft_wrap=True, highlight=False)

DEFAULT_FILE = Path("/var/lib/mosquitto/edgefleet-dynsec.json")


@app.callback(no_args_is_help=True)
def _group() -> None:
    """Set up the MQTT broker's logins (Mosquitto dynamic security)."""


@app.command("init")
def init(
    dynsec_file: Annotated[
        Path, typer.Option("--dynsec-file", help="the plugin's file (plugin_opt_config_file)")
    ] = DEFAULT_FILE,
    username: Annotated[
        str, typer.Option("--username", envvar="EDGEFLEET_MQTT_USERNAME", help="the cloud's login")
    ] = DEFAULT_CLOUD_USERNAME,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="read the cloud's password from this file's first line ('-': standard input); "
            "else EDGEFLEET_MQTT_PASSWORD, else one is generated and printed once",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing file: every device login is lost")
    ] = False,
) -> None:
    """Write the broker's dynamic-security file: the cloud's login and the device role.

    The cloud's login administers dynamic security and uses all of edgefleet/v1/#, its
    shared subscriptions and $SYS; the role every device shares reads artifacts and the budget.
    The password is never an argument: a command line shows in `ps` and the shell's history.
    """
    password = _given_password(password_file)
    generated = password is None
    secret = new_password() if password is None else password
    try:
        write_dynsec_config(
            dynsec_file, cloud_username=username, cloud_password=secret, overwrite=force
        )
    except Conflict as exc:
        console.print(f"[red]{exc.message}[/red] (--force replaces it)")
        raise typer.Exit(1) from None
    console.print(f"wrote {dynsec_file} (mode 0600): login {username!r} and the device role")
    console.print(
        "Next: make it the broker's (chown mosquitto:mosquitto, folder included), start "
        "mosquitto with deploy/mosquitto/dynsec.conf, and run the cloud with:"
    )
    console.print("  EDGEFLEET_BROKER_ACCOUNTS=dynsec")
    console.print(f"  EDGEFLEET_MQTT_USERNAME={username}")
    if generated:
        console.print(f"  EDGEFLEET_MQTT_PASSWORD={secret}   (shown once; keep it secret)")
    else:
        console.print("  EDGEFLEET_MQTT_PASSWORD=<the password you gave>")


def _given_password(password_file: Path | None) -> str | None:
    if password_file is None:
        return os.environ.get("EDGEFLEET_MQTT_PASSWORD") or None
    try:
        text = sys.stdin.read() if str(password_file) == "-" else password_file.read_text()
    except OSError as exc:
        console.print(f"[red]cannot read the password file: {exc.strerror}[/red]")
        raise typer.Exit(1) from None
    lines = text.splitlines()
    if not lines or not lines[0]:
        console.print("[red]the password file's first line is empty[/red]")
        raise typer.Exit(1)
    return lines[0]
