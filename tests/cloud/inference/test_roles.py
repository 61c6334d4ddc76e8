"""`edgefleet serve --role`: the inference role serves KServe v2 (REST and gRPC) and no
control plane; the all-in-one process serves both on one port, and /metrics shows both."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from cloud.context import CloudContext
from cloud.launcher import run_cloud
from cloud.roles import Role
from cloud.settings import CloudSettings

TOKEN = "roles-admin-token-0123456789"


def _settings(tmp_path: Path) -> CloudSettings:
    return CloudSettings(data_dir=tmp_path / "cloud", admin_token=TOKEN, api_port=0)


def _run(tmp_path: Path, role: Role) -> dict[str, object]:
    seen: dict[str, object] = {}

    def on_ready(context: CloudContext, url: str, stop: threading.Event) -> None:
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
                seen["live"] = c.get("/v2/health/live").status_code
                seen["models"] = c.get("/v1/models").status_code
                seen["metrics"] = c.get("/metrics").text
        finally:
            stop.set()

    run_cloud(_settings(tmp_path), on_ready=on_ready, stop=threading.Event(), role=role)
    return seen


def test_the_inference_role_serves_v2_and_no_control_plane(tmp_path: Path) -> None:
    """Role inference: /v2 answers, /v1 is not there, /metrics has the nv_inference series."""
    seen = _run(tmp_path, Role.INFERENCE)
    assert seen["live"] == 200
    assert seen["models"] == 404
    assert "nv_inference_request_success" in str(seen["metrics"])


def test_all_serves_the_api_and_inference_on_one_port(tmp_path: Path) -> None:
    """Role all (the demo's): the control-plane API and /v2 on the same URL, and gRPC."""
    settings = _settings(tmp_path).model_copy(update={"grpc_port": 0})
    seen: dict[str, object] = {}

    def on_ready(context: CloudContext, url: str, stop: threading.Event) -> None:
        try:
            with httpx.Client(base_url=url, timeout=30) as c:
                seen["live"] = c.get("/v2/health/live").status_code
                seen["models"] = c.get(
                    "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}
                ).status_code
                text = c.get("/metrics").text
            seen["both"] = "nv_inference_count" in text and "edgefleet_http_requests" in text
        finally:
            stop.set()

    run_cloud(settings, on_ready=on_ready, stop=threading.Event(), role=Role.ALL)
    assert seen == {"live": 200, "models": 200, "both": True}


def test_the_grpc_port_follows_the_api_port(tmp_path: Path) -> None:
    """Unset, gRPC listens on the API port + 1; with a free API port, on a free port."""
    assert _settings(tmp_path).model_copy(update={"api_port": 8000}).resolved_grpc_port == 8001
    assert _settings(tmp_path).resolved_grpc_port == 0
