"""Federated: Flower runs, each run's metrics round by round, and the version it produced.
Clouds without federated learning answer 404, which the page says plainly."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient
from dashboard.ui import frame, live, not_available, optional, when

__all__ = ["RUNS_PATH", "render", "rounds_of"]

RUNS_PATH = "/v1/federated/runs"
_COLUMNS = ["id", "model", "base version", "state", "rounds", "result version", "created"]


def render(api: ApiClient) -> None:
    live(api, _runs)


def _items(body: Any) -> list[dict[str, Any]]:
    # A list, or a page {"items": [...]}: read either.
    if isinstance(body, dict):
        body = body.get("items", [])
    return [run for run in body if isinstance(run, dict)] if isinstance(body, list) else []


def rounds_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-round metrics of a run: ``rounds`` on the run or in its ``metrics``, as a list of
    {round, metric: value} (numbers only)."""
    rounds = run.get("rounds")
    if rounds is None:
        rounds = (run.get("metrics") or {}).get("rounds")
    rows = []
    for index, entry in enumerate(rounds if isinstance(rounds, list) else [], start=1):
        if isinstance(entry, dict):
            numbers = {k: v for k, v in entry.items() if isinstance(v, int | float)}
            rows.append({"round": index, **numbers})
    return rows


def _version(run: dict[str, Any], *names: str) -> Any:
    for name in names:
        if run.get(name) is not None:
            return run[name]
    return "—"


def _runs(api: ApiClient) -> None:
    body = optional(api, RUNS_PATH)
    if body is None:
        not_available("Federated learning", RUNS_PATH)
        return
    runs = _items(body)
    if not runs:
        st.info("No federated runs yet.")
        return
    rows = [
        {
            "id": run.get("id"), "model": run.get("model"),
            "base version": _version(run, "base_version", "base_version_id"),
            "state": run.get("state"), "rounds": len(rounds_of(run)),
            "result version": _version(run, "result_version", "result_version_id"),
            "created": when(run.get("created_at")),
        }
        for run in runs
    ]  # fmt: skip
    st.dataframe(frame(rows, _COLUMNS), hide_index=True, width="stretch")
    ids = [run.get("id") for run in runs]
    chosen = st.selectbox("Run", ids, key="federated_run")
    run = next(r for r in runs if r.get("id") == chosen)
    per_round = rounds_of(run)
    if not per_round:
        st.info("This run has no per-round metrics yet.")
        return
    data = pd.DataFrame(per_round)
    metrics = [c for c in data.columns if c != "round"]
    st.caption("Metrics per round")
    st.line_chart(data, x="round", y=metrics, height=260)
