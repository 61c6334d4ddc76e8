"""`edgefleet federated …`: run the SuperLink, start and follow federated runs (over the cloud
REST API), and register a device's SuperNode key with the SuperLink."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from cloud.federated.coordinator import flower_cli
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from cloud.launcher import stop_on_signals
from cloud.settings import CloudSettings
from shared.errors import EdgeFleetError

__all__ = ["app"]

app = typer.Typer(help="Federated learning with Flower.", no_args_is_help=True)
console = Console(soft_wrap=True)

ApiOption = Annotated[
    str, typer.Option("--api", envvar="EDGEFLEET_API_URL", help="cloud API base URL")
]
TokenOption = Annotated[
    str, typer.Option("--token", envvar="EDGEFLEET_ADMIN_TOKEN", help="admin bearer token")
]
DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="the cloud's data dir (EDGEFLEET_DATA_DIR)")
]
DEFAULT_API = "http://127.0.0.1:8000"
_FINAL = {"COMPLETED", "GATE_FAILED", "TOO_FEW_CLIENTS", "FAILED", "CANCELLED"}


def _fail(message: str, code: int = 1) -> typer.Exit:
    console.print(f"[red]{message}[/red]", highlight=False)
    return typer.Exit(code)


def _settings(data_dir: Path | None) -> tuple[CloudSettings, FederatedSettings]:
    try:
        overrides: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
        return CloudSettings(**overrides), FederatedSettings()
    except ValidationError as exc:
        raise _fail(f"configuration error: {exc.errors()[0]['msg']}", 2) from None


def _call(api: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with httpx.Client(
            base_url=api, headers={"Authorization": f"Bearer {token}"}, timeout=60
        ) as client:
            response = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise _fail(f"cannot reach the cloud API at {api}: {exc}", 2) from None
    if response.is_success:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    raise _fail(f"error {response.status_code}: {message}")


@app.command()
def serve(data_dir: DataDirOption = None) -> None:
    """Run the SuperLink (`flower-superlink`, on 127.0.0.1:EDGEFLEET_FEDERATED_INTERNAL_PORT)
    and the fleet gateway devices reach (EDGEFLEET_FEDERATED_HOST:PORT) until Ctrl-C: TLS
    from EDGEFLEET_FEDERATED_SSL_*, plain HTTP only in dev mode (EDGEFLEET_DEV_MODE=1)."""
    cloud, settings = _settings(data_dir)
    try:
        superlink = SuperLink(settings, data_dir=cloud.data_dir, dev_mode=cloud.dev_mode)
        superlink.start()
    except EdgeFleetError as exc:
        raise _fail(f"the SuperLink did not start: {exc.message}") from None
    scheme = "TLS" if settings.tls else "plain HTTP (dev mode)"
    auth = ", SuperNode authentication on" if settings.supernode_auth else ""
    console.print(
        f"SuperLink on 127.0.0.1:{settings.superlink_port} (Control API, this host only); "
        f"Fleet API for devices on {settings.host}:{settings.port} ({scheme}{auth}); "
        f"log {superlink.log_path}",
        highlight=False,
    )
    console.print("Ctrl-C stops it.")
    stop = threading.Event()
    try:
        with stop_on_signals(stop):
            while not stop.wait(1.0):
                code = superlink.died()
                if code is not None:
                    raise _fail(f"the SuperLink exited ({code}); see {superlink.log_path}")
    finally:
        superlink.stop()
    console.print("SuperLink stopped.")


def _labels(pairs: list[str]) -> dict[str, str]:
    selector = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise _fail(f"--selector takes key=value, got {pair!r}", 2)
        selector[key] = value
    return selector


def _print_rounds(run: dict[str, Any], shown: int) -> int:
    for r in run.get("round_metrics", [])[shown:]:
        loss = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
        console.print(
            f"  round {r['round']}: {r['clients']} devices, {r['examples']} examples, "
            f"loss {loss}, {r['wall_s']:.1f}s, {r['bytes_down']} B down / {r['bytes_up']} B up"
            + (f", {r['dropped']} dropped" if r["dropped"] else "")
            + (f", {r['refused']} refused" if r["refused"] else ""),
            highlight=False,
        )
        shown += 1
    return shown


@app.command()
def run(
    model: Annotated[str, typer.Argument(help="model name, e.g. digits-edge")],
    rounds: Annotated[int, typer.Option(min=1, max=100)] = 3,
    min_clients: Annotated[int, typer.Option(min=1)] = 2,
    selector: Annotated[list[str] | None, typer.Option(help="device label key=value")] = None,
    base_version: Annotated[int | None, typer.Option(help="FP32 version (default latest)")] = None,
    strategy: Annotated[str, typer.Option(help="fedavg or fedprox")] = "fedavg",
    proximal_mu: Annotated[float, typer.Option(help="FedProx's mu")] = 0.1,
    dp_noise: Annotated[float | None, typer.Option(help="server-side DP noise multiplier")] = None,
    dp_clip: Annotated[float, typer.Option(help="server-side DP clipping norm")] = 1.0,
    eval_dataset: Annotated[str | None, typer.Option(help="e.g. builtin:digits-rotated-20")] = None,
    max_drop_pt: Annotated[float, typer.Option(help="accuracy drop allowed (points)")] = 3.0,
    canary: Annotated[int | None, typer.Option(help="canary rollout to N devices")] = None,
    wait: Annotated[bool, typer.Option(help="follow the run until it ends")] = True,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = "",
) -> None:
    """Start a federated run (POST /v1/federated/runs) and follow it round by round."""
    body: dict[str, Any] = {
        "model": model, "rounds": rounds, "min_clients": min_clients,
        "selector": _labels(selector or []), "strategy": strategy, "proximal_mu": proximal_mu,
        "gate": {"max_drop_pt": max_drop_pt, "eval_dataset": eval_dataset},
    }  # fmt: skip
    if base_version is not None:
        body["base_version"] = base_version
    if dp_noise is not None:
        body["dp"] = {"noise_multiplier": dp_noise, "clipping_norm": dp_clip}
    if canary is not None:
        body["rollout"] = {"canary": canary}
    created = _call(api, token, "POST", "/v1/federated/runs", json=body)
    run_id = created["id"]
    console.print(
        f"federated run {run_id}: {model}:{created['base_version']}, {rounds} rounds, "
        f"{len(created['config']['devices'])} devices named",
        highlight=False,
    )
    if not wait:
        return
    shown, state = 0, created["state"]
    while state not in _FINAL:
        time.sleep(2.0)
        current = _call(api, token, "GET", f"/v1/federated/runs/{run_id}")
        shown = _print_rounds(current, shown)
        if current["state"] != state:
            state = current["state"]
            console.print(f"  {state}", highlight=False)
    final = _call(api, token, "GET", f"/v1/federated/runs/{run_id}")
    _print_rounds(final, shown)
    if state == "COMPLETED":
        console.print(
            f"[green]{model}:{final['result_version']} (FP32) and "
            f"{model}:{final['result_int8_version']} (INT8) registered[/green]"
            + (f", canary rollout {final['rollout_id']}" if final["rollout_id"] else ""),
            highlight=False,
        )
        if final["reason"]:
            console.print(final["reason"], highlight=False)
        return
    raise _fail(f"run {run_id} ended {state}: {final['reason']}")


@app.command("list")
def list_runs(api: ApiOption = DEFAULT_API, token: TokenOption = "") -> None:
    """Federated runs, newest first."""
    table = Table("id", "model", "base", "state", "rounds", "result", "reason")
    for r in _call(api, token, "GET", "/v1/federated/runs"):
        result = f"{r['result_version']}/{r['result_int8_version']}" if r["result_version"] else ""
        table.add_row(
            str(r["id"]), r["model"], str(r["base_version"]), r["state"],
            f"{r['rounds_done']}/{r['rounds']}", result, (r["reason"] or "")[:60],
        )  # fmt: skip
    console.print(table)


@app.command()
def show(run_id: int, api: ApiOption = DEFAULT_API, token: TokenOption = "") -> None:
    """One run: state, rounds, gate scores, versions."""
    current = _call(api, token, "GET", f"/v1/federated/runs/{run_id}")
    console.print(f"run {run_id}: {current['state']} {current['reason'] or ''}", highlight=False)
    _print_rounds(current, 0)
    gate = current["metrics"].get("gate")
    if gate:
        console.print(f"  gate: {gate}", highlight=False)


@app.command()
def cancel(run_id: int, api: ApiOption = DEFAULT_API, token: TokenOption = "") -> None:
    """Stop a pending or running run."""
    current = _call(api, token, "POST", f"/v1/federated/runs/{run_id}/cancel")
    console.print(f"run {run_id}: {current['state']}", highlight=False)


@app.command("register-node")
def register_node(
    public_key: Annotated[Path, typer.Argument(help="the device's node_key.pub (OpenSSH EC)")],
    name: Annotated[str | None, typer.Option(help="a name for it (the device id)")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Let a device's SuperNode in (SuperNode authentication): register its public key."""
    cloud, settings = _settings(data_dir)
    cli = flower_cli(cloud.data_dir, settings)
    try:
        node_id = cli.register_node(public_key, name)
    except EdgeFleetError as exc:
        raise _fail(exc.message) from None
    console.print(f"SuperNode key {public_key} registered (node {node_id})", highlight=False)
