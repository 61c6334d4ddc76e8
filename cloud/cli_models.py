"""`edgefleet model …`: the model pipeline from a terminal, over the cloud REST API."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from cloud.settings import DEV_ADMIN_TOKEN

__all__ = ["app"]

app = typer.Typer(help="Register, quantize and list models.", no_args_is_help=True)
console = Console(soft_wrap=True)

ApiOption = Annotated[
    str, typer.Option("--api", envvar="EDGEFLEET_API_URL", help="cloud API base URL")
]
TokenOption = Annotated[
    str, typer.Option("--token", envvar="EDGEFLEET_ADMIN_TOKEN", help="admin bearer token")
]
DEFAULT_API = "http://127.0.0.1:8000"


def _client(api: str, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=api,
        headers={"Authorization": f"Bearer {token}"},
        timeout=httpx.Timeout(600, connect=5),
    )


def _check(response: httpx.Response) -> Any:
    if response.is_success:
        return response.json()
    try:
        message = response.json().get("error", response.text)
    except ValueError:
        message = response.text
    console.print(f"[red]error {response.status_code}:[/red] {message}")
    raise typer.Exit(1)


def _call(api: str, token: str, method: str, path: str, **kwargs: Any) -> Any:
    try:
        with _client(api, token) as client:
            return _check(client.request(method, path, **kwargs))
    except httpx.TransportError as exc:
        console.print(f"[red]cannot reach the cloud API at {api}:[/red] {exc}")
        raise typer.Exit(2) from None


def _spinner() -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    )


def _print_versions(rows: list[dict[str, Any]]) -> None:
    table = Table("model", "version", "parent", "precision", "size", "metrics", "routing")
    warnings: list[str] = []
    for v in rows:
        routing = v.get("routing") or {}
        threshold = routing.get("threshold")
        route = f"{routing.get('policy')} < {threshold:.4f}" if threshold is not None else ""
        numbers = {k: val for k, val in v["metrics"].items() if isinstance(val, int | float)}
        metrics = ", ".join(f"{k}={val:g}" for k, val in sorted(numbers.items()))
        warnings += [f"{v['model']}:{v['version']}: {w}" for w in v["metrics"].get("warnings", [])]
        table.add_row(
            v["model"], str(v["version"]), str(v.get("parent_version") or ""), v["precision"],
            f"{v['size'] / 1024:.1f} KiB", metrics, route,
        )  # fmt: skip
    console.print(table)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", highlight=False)


@app.command("build-reference")
def build_reference(
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
    minilm: Annotated[
        bool, typer.Option(help="also MiniLM (the cloud needs the models extra)")
    ] = False,
) -> None:
    """Build the reference models and register them, FP32 and INT8."""
    names = ["digits-cloud", "digits-edge", "digits-edge-weak"] + (["minilm"] if minilm else [])
    added: list[dict[str, Any]] = []
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("reference models", total=len(names))
        for name in names:
            progress.update(task, description=f"building {name}")
            added += _call(api, token, "POST", "/v1/reference-models", json={"models": [name]})
            progress.advance(task)
    if added:
        _print_versions(added)
    else:
        console.print("all reference models were already registered")


class _CountingFile(io.BufferedReader):
    """A file that reports each read: httpx reads it while it uploads, so the bar is the
    upload itself, and the file is never held in memory whole."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._on_read = on_read

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self._on_read(len(data))
        return data


@app.command("add")
def add(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    name: Annotated[str, typer.Option(help="model name (created if new)")],
    precision: Annotated[str, typer.Option(help="fp32, fp16 or int8")] = "fp32",
    metadata: Annotated[str | None, typer.Option(help="extra VersionCreate JSON")] = None,
    task: Annotated[str, typer.Option(help="task if the model is new")] = "classification",
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Upload an ONNX file as the next version of a model."""
    try:
        meta = {"precision": precision, **(json.loads(metadata) if metadata else {})}
    except json.JSONDecodeError as exc:
        console.print(f"[red]--metadata is not JSON:[/red] {exc.msg}")
        raise typer.Exit(2) from None
    with _client(api, token) as client:
        if client.get(f"/v1/models/{name}").status_code == 404:
            _check(client.post("/v1/models", json={"name": name, "task": task}))
        with Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=console,
        ) as progress:  # fmt: skip
            task_id = progress.add_task(f"upload {file.name}", total=file.stat().st_size)
            with _CountingFile(file, lambda n: progress.advance(task_id, n)) as body:
                response = client.post(
                    f"/v1/models/{name}/versions",
                    files={"file": (file.name, body, "application/octet-stream")},
                    data={"metadata": json.dumps(meta)},
                )
        version = _check(response)
    _print_versions([version])


@app.command("quantize")
def quantize(
    name: str,
    version: int,
    data: Annotated[Path | None, typer.Option(help=".npz with inputs and labels y")] = None,
    target: Annotated[str | None, typer.Option(help="budget:0.2 or gap:0.8")] = None,
    cloud_model: Annotated[str | None, typer.Option(help="NAME:VERSION for a gap target")] = None,
    policy: Annotated[str | None, typer.Option(help="max_prob, margin or entropy")] = None,
    max_drop_pt: Annotated[float, typer.Option(help="accuracy loss allowed (points)")] = 0.5,
    allow_larger: Annotated[
        bool, typer.Option(help="register the INT8 child even if larger than its parent")
    ] = False,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Quantize an FP32 version to INT8, gated against its parent, routing calibrated.
    An INT8 child larger than its parent is refused unless --allow-larger."""
    given = {"target": target, "cloud_model": cloud_model, "policy": policy}
    options: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    options["max_drop_pt"] = max_drop_pt
    if allow_larger:
        options["allow_larger"] = True
    files = (
        {"dataset": (data.name, data.read_bytes(), "application/octet-stream")} if data else None
    )
    with _spinner() as spin:
        spin.add_task(f"quantizing {name}:{version}", total=None)
        result = _call(
            api, token, "POST", f"/v1/models/{name}/versions/{version}/quantize",
            data={"options": json.dumps(options)}, files=files,
        )  # fmt: skip
    _print_versions([result])


@app.command("list")
def list_models(
    name: Annotated[str | None, typer.Argument(help="one model's versions")] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """List models, or the versions of one."""
    if name:
        _print_versions(_call(api, token, "GET", f"/v1/models/{name}/versions"))
        return
    table = Table("model", "task", "latest", "description")
    for m in _call(api, token, "GET", "/v1/models"):
        table.add_row(m["name"], m["task"], str(m["latest_version"] or ""), m["description"])
    console.print(table)
