"""`edgefleet model distill|prune|fp16|report`: compression from a terminal, over the REST API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

# The model group's own helpers, so these commands look and fail like the others.
from cloud.cli_models import (
    DEFAULT_API,
    ApiOption,
    TokenOption,
    _call,
    _print_versions,
    _spinner,
    app,
    console,
)
from cloud.settings import DEV_ADMIN_TOKEN

__all__ = ["distill", "fp16", "prune", "report"]

DataOption = Annotated[
    Path | None,
    typer.Option(help=".npz with inputs (x) and labels y; default: the recorded dataset"),
]
CloudOption = Annotated[
    str | None, typer.Option(help="NAME:VERSION the edge child routes hard inputs to")
]


def _files(data: Path | None) -> dict[str, Any] | None:
    if data is None:
        return None
    return {"dataset": (data.name, data.read_bytes(), "application/octet-stream")}


def _post(
    api: str, token: str, path: str, what: str, options: dict[str, Any], data: Path | None
) -> None:
    with _spinner() as spin:
        spin.add_task(what, total=None)
        result = _call(
            api, token, "POST", path, data={"options": json.dumps(options)}, files=_files(data)
        )
    _print_versions([result])
    details = result["metrics"].get("compression", {})
    if "hard_label_accuracy" in details:
        console.print(
            f"student accuracy {result['metrics']['accuracy']:.2%}; the same architecture on "
            f"hard labels alone: {details['hard_label_accuracy']:.2%}",
            highlight=False,
        )


@app.command("distill")
def distill(
    student: Annotated[
        str, typer.Argument(help="student architecture: mlp:64,32 or mlp:32,16:pool2")
    ],
    teacher: Annotated[str, typer.Option(help="NAME:VERSION of the teacher")],
    name: Annotated[
        str | None, typer.Option(help="student model (default TEACHER-student)")
    ] = None,
    data: DataOption = None,
    temperature: Annotated[float, typer.Option(help="softening temperature T")] = 8.0,
    alpha: Annotated[float, typer.Option(help="weight of the soft loss (1 - alpha: labels)")] = 0.9,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 150,
    max_drop_pt: Annotated[float, typer.Option(help="accuracy below the teacher allowed")] = 2.0,
    cloud_model: CloudOption = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Train an edge student on a teacher's softened outputs, gated against the teacher."""
    target = name or f"{teacher.rpartition(':')[0]}-student"
    options: dict[str, Any] = {
        "student": student, "teacher": teacher, "temperature": temperature, "alpha": alpha,
        "epochs": epochs, "max_drop_pt": max_drop_pt,
    }  # fmt: skip
    if cloud_model:
        options["cloud_model"] = cloud_model
    _post(api, token, f"/v1/models/{target}/distill", f"distilling {student} from {teacher}",
          options, data)  # fmt: skip


@app.command("prune")
def prune(
    name: str,
    version: int,
    sparsity: Annotated[float, typer.Option(help="share removed, in [0, 1)")],
    method: Annotated[str, typer.Option(help="structured or magnitude")] = "structured",
    fine_tune: Annotated[bool, typer.Option(help="short fine-tune after pruning")] = False,
    quantize: Annotated[bool, typer.Option(help="INT8 after pruning")] = False,
    max_drop_pt: Annotated[float, typer.Option(help="accuracy loss allowed (points)")] = 0.5,
    min_cosine: Annotated[float, typer.Option(help="cosine to the parent (embeddings)")] = 0.99,
    data: DataOption = None,
    cloud_model: CloudOption = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Prune an FP32 version, gated against it; the child is registered under it."""
    options: dict[str, Any] = {
        "sparsity": sparsity, "method": method, "fine_tune": fine_tune, "quantize": quantize,
        "max_drop_pt": max_drop_pt, "min_cosine": min_cosine,
    }  # fmt: skip
    if cloud_model:
        options["cloud_model"] = cloud_model
    _post(api, token, f"/v1/models/{name}/versions/{version}/prune",
          f"pruning {name}:{version}", options, data)  # fmt: skip


@app.command("fp16")
def fp16(
    name: str,
    version: int,
    max_drop_pt: Annotated[float, typer.Option(help="accuracy loss allowed (points)")] = 0.5,
    min_cosine: Annotated[float, typer.Option(help="cosine to the parent (embeddings)")] = 0.99,
    data: DataOption = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Convert an FP32 version to FP16 for GPU serving, gated against it."""
    options = {"max_drop_pt": max_drop_pt, "min_cosine": min_cosine}
    _post(api, token, f"/v1/models/{name}/versions/{version}/fp16",
          f"converting {name}:{version} to FP16", options, data)  # fmt: skip


def _number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else ""


@app.command("report")
def report(
    name: str,
    cloud_model: Annotated[
        str | None, typer.Option(help="NAME:VERSION to compute each version's APGR against")
    ] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = DEV_ADMIN_TOKEN,
) -> None:
    """Each version's size, latency ratio to its parent, accuracy or cosine, and APGR."""
    params = {"cloud_model": cloud_model} if cloud_model else None
    body = _call(api, token, "GET", f"/v1/models/{name}/compression", params=params)
    table = Table(
        "version", "from", "precision", "source", "size", "size ÷ parent", "p50 ÷ parent",
        "accuracy", "drop pt", "cosine", "APGR",
    )  # fmt: skip
    for v in body["versions"]:
        origin = f"teacher {v['teacher']}" if v["teacher"] else str(v["parent_version"] or "")
        table.add_row(
            str(v["version"]), origin, v["precision"], v["source"], f"{v['size'] / 1024:.1f} KiB",
            _number(v["size_ratio"], ".3f"), _number(v["latency_ratio"], ".3f"),
            _number(v["accuracy"], ".2%"), _number(v["accuracy_drop_pt"], ".2f"),
            _number(v["cosine_mean"], ".4f"), _number(v["apgr"], ".3f"),
        )  # fmt: skip
    console.print(table)
