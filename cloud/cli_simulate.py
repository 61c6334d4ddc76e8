"""`edgefleet simulate`: N simulated devices (real agents, many per process) against a cloud."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import typer
from rich.console import Console

from cloud.cli_models import DEFAULT_API, ApiOption, TokenOption
from cloud.launcher import stop_on_signals
from cloud.settings import DEV_ADMIN_TOKEN
from cloud.simulate.data_dir import check_room, clean, default_data_dir
from cloud.simulate.fleet import Faults, FleetStatus, SimulatedFleet
from shared.errors import EdgeFleetError

__all__ = ["simulate"]

console = Console(soft_wrap=True, highlight=False)
_REPORT_EVERY_S = 2.0


def describe(status: FleetStatus, total: int) -> str:
    active = ", ".join(f"{k} on {n}" for k, n in sorted(status.active.items())) or "no model"
    return (
        f"{status.connected}/{total} connected, {status.deploying} deploying, active: {active}; "
        f"{status.threads_per_agent:.1f} threads and {status.mib_per_agent:.2f} MiB per agent"
    )


def _labels(given: list[str]) -> dict[str, str]:
    labels = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise typer.BadParameter(f"label {item!r} must look like key=value")
        labels[key] = value
    return labels


def simulate(
    agents: Annotated[int, typer.Option(help="simulated devices", min=1, max=100_000)] = 100,
    processes: Annotated[
        int | None, typer.Option(help="worker processes (default: one per 100 agents)", min=1)
    ] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
    data_dir: Annotated[
        Path | None, typer.Option(help="devices' folders (default: under /dev/shm)")
    ] = None,
    prefix: Annotated[
        str, typer.Option(help="device ids are PREFIX-0001…; label simulated=PREFIX")
    ] = "sim",
    label: Annotated[list[str], typer.Option(help="key=value on every device")] = [],  # noqa: B006
    chunk_loss: Annotated[
        float, typer.Option(help="share of received chunks lost before the store", min=0, max=0.99)
    ] = 0.0,
    restart_share: Annotated[
        float, typer.Option(help="share of devices restarted once mid-download", min=0, max=1)
    ] = 0.0,
    slow_share: Annotated[float, typer.Option(help="share of slow devices", min=0, max=1)] = 0.0,
    slow_delay_ms: Annotated[
        float, typer.Option(help="a slow device's delay per chunk", min=0, max=10_000)
    ] = 50.0,
    seed: Annotated[int, typer.Option(help="which devices get which fault")] = 0,
    broken_version: Annotated[
        str | None,
        typer.Option(
            metavar="MODEL",
            help="first register a copy of MODEL's newest version whose golden outputs are "
            "wrong (it fails every device's health check): roll it out to see a canary stop it",
        ),
    ] = None,
    duration: Annotated[float | None, typer.Option(help="stop after N seconds")] = None,
    fresh: Annotated[
        bool, typer.Option("--clean", help="first remove what earlier runs left in the data dir")
    ] = False,
    keep: Annotated[
        bool,
        typer.Option(
            "--keep", help="leave the devices' folders (tokens, models) after a run that ends well"
        ),
    ] = False,
) -> None:
    """Enroll N devices and run them as real agents (their MQTT, delivery, verification,
    health check and activation) in worker processes, until Ctrl-C; print the fleet's state.
    Roll a model out to them with `POST /v1/rollouts` and selector {"simulated": PREFIX}.
    The devices' folders are removed when the run ends well, unless --keep."""
    try:
        root = data_dir or default_data_dir(prefix, agents, say=console.print)
        if fresh:
            clean(root)
        check_room(root, agents)
    except EdgeFleetError as exc:
        console.print(f"[red]cannot simulate:[/red] {exc.message}")
        raise typer.Exit(2) from None
    except OSError as exc:
        console.print(f"[red]cannot simulate:[/red] {exc}")
        raise typer.Exit(2) from None
    faults = Faults(
        chunk_loss=chunk_loss, restart_share=restart_share, slow_share=slow_share,
        slow_delay_s=slow_delay_ms / 1000, seed=seed,
    )  # fmt: skip
    stop = threading.Event()
    try:
        fleet = SimulatedFleet(
            api_url=api, admin_token=token, root=root, agents=agents, prefix=prefix,
            labels=_labels(label), processes=processes, faults=faults,
        )  # fmt: skip
    except EdgeFleetError as exc:
        console.print(f"[red]cannot simulate:[/red] {exc.message}")
        raise typer.Exit(2) from None
    ended_well = False
    with stop_on_signals(stop):
        try:
            if broken_version is not None:
                from cloud.simulate.broken import register_broken  # onnx: only when asked

                with httpx.Client(
                    base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=120
                ) as client:
                    row = register_broken(client, broken_version)
                console.print(
                    f"registered {broken_version}:{row['version']}: its health check fails "
                    "on every device"
                )
            enrolled = fleet.enroll()
            console.print(f"{agents} devices ({enrolled} enrolled now) under {root}")
            fleet.start()
            console.print(f"{len(fleet.workers)} worker processes (logs in {root / 'workers'})")
            fleet.wait_started(max(60.0, agents / 10), stop.is_set)
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.wait(_REPORT_EVERY_S):
                console.print(describe(fleet.status(), agents))
                if deadline is not None and time.monotonic() >= deadline:
                    break
            ended_well = True
        except EdgeFleetError as exc:
            console.print(f"[red]simulation stopped:[/red] {exc.message}")
            raise typer.Exit(1) from None
        except Exception as exc:
            console.print(f"[red]simulation stopped:[/red] {type(exc).__name__}: {exc}")
            raise typer.Exit(1) from None
        finally:
            console.print("stopping the simulated devices")
            fleet.stop()
            _tidy(root, removable=ended_well and not keep, ours=data_dir is None)


def _tidy(root: Path, *, removable: bool, ours: bool) -> None:
    """Remove the devices' folders (``ours``: the default data dir, itself too), or say
    where they are kept."""
    if not removable:
        console.print(f"the devices' folders are kept under {root} (workers' logs in workers/)")
        return
    try:
        clean(root)
    except OSError as exc:
        console.print(f"[red]could not remove the devices' folders under {root}:[/red] {exc}")
        return
    if ours:
        with contextlib.suppress(OSError):  # not empty: something else is kept there
            root.rmdir()
    console.print(f"removed the devices' folders under {root}")
