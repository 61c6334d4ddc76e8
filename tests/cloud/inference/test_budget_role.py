"""The budget in each process role: ``inference`` runs its loop on a broker link of its own
(it has no fleet service), ``all`` on the fleet service's; both show the budget in /metrics
and over REST; ``api`` and ``fleet`` run no loop; EDGEFLEET_INFERENCE_BUDGET=false runs none."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from cloud.context import CloudContext
from cloud.launcher import run_cloud
from cloud.roles import Role, build_role
from cloud.settings import CloudSettings

TOKEN = "budget-admin-token-0123456789"


def _run(tmp_path: Path, role: Role, **settings: object) -> dict[str, object]:
    seen: dict[str, object] = {}

    def on_ready(context: CloudContext, url: str, stop: threading.Event) -> None:
        try:
            headers = {"Authorization": f"Bearer {TOKEN}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
                seen["budget"] = c.get("/v1/inference/budget").json()
                seen["metrics"] = c.get("/metrics").text
        finally:
            stop.set()

    config = CloudSettings(
        data_dir=tmp_path / "cloud", admin_token=TOKEN, api_port=0, grpc_port=0, **settings
    )
    run_cloud(config, on_ready=on_ready, stop=threading.Event(), role=role)
    return seen


@pytest.mark.parametrize("role", [Role.INFERENCE, Role.ALL])
def test_a_role_that_serves_inference_runs_the_budget_loop(tmp_path: Path, role: Role) -> None:
    seen = _run(tmp_path, role)
    assert seen["budget"] == {
        "enabled": True,
        "queue_bound_ms": 100.0,
        "budget": None,
        "saturated_replicas": [],
    }
    metrics = str(seen["metrics"])
    assert "edgefleet_inference_offload_budget 1.0" in metrics
    assert "edgefleet_inference_saturated 0.0" in metrics


@pytest.mark.parametrize(
    ("role", "enabled"), [(Role.API, True), (Role.FLEET, True), (Role.INFERENCE, False)]
)
def test_no_loop_where_nothing_is_served_or_when_turned_off(
    context: CloudContext, role: Role, enabled: bool
) -> None:
    """Built, not started: the parts a process would run."""
    context.settings = context.settings.model_copy(update={"inference_budget": enabled})
    parts = build_role(context, role)
    try:
        assert parts.budget is None
        assert all("budget" not in name for name, _step in parts.stop_steps())
    finally:
        if parts.inference is not None:
            parts.inference.close()
