"""Helpers for API tests: registry snapshots and uploads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from cloud.context import CloudContext
from cloud.registry.tables import Artifact, AuditEvent, Device, Model, ModelVersion


def snapshot(context: CloudContext) -> dict[str, Any]:
    """Row counts and artifact files: what a rejected request must not change."""
    with context.database.session() as s:
        counts = {
            t.__tablename__: s.scalar(select(func.count()).select_from(t))
            for t in (Model, ModelVersion, Artifact, Device, AuditEvent)
        }
    root: Path = context.artifacts.root
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    return {"rows": counts, "files": files}


def upload(
    client: httpx.Client, model: str, data: bytes, metadata: dict[str, Any] | None = None
) -> httpx.Response:
    form = {"metadata": json.dumps(metadata)} if metadata is not None else {}
    return client.post(
        f"/v1/models/{model}/versions",
        files={"file": ("model.onnx", data, "application/octet-stream")},
        data=form,
    )
