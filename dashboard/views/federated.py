"""Federated: the Flower runs (``GET /v1/federated/runs``), one run's metrics round by round
and the versions it produced (``GET /v1/federated/runs/{id}``), and cancelling a run that is
still going on. Clouds without federated learning answer 404, which the page says plainly."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, ApiError
from dashboard.ui import frame, live, not_available, optional, when

__all__ = ["RUNS_PATH", "render", "round_table"]

RUNS_PATH = "/v1/federated/runs"
_COLUMNS = [
    "id", "model", "base version", "state", "rounds", "result version", "INT8 version",
    "rollout", "created", "finished", "reason",
]  # fmt: skip
# Per-round series, as the API names them, and how the page labels them.
_TRAINING = {"train_loss": "train loss"}
_CLIENTS = {"clients": "clients", "dropped": "dropped", "refused": "refused"}
_TRAFFIC = {"bytes_down": "MB down", "bytes_up": "MB up"}


def render(api: ApiClient) -> None:
    if note := st.session_state.pop("federated_note", None):
        st.success(note)
    runs = optional(api, RUNS_PATH, params={"limit": 50})
    if runs is None:
        not_available("Federated learning", RUNS_PATH)
        return
    if not runs:
        st.info(
            "No federated runs yet. Start one with `edgefleet federated run MODEL` "
            f"or POST {RUNS_PATH}."
        )
        return
    rows = [_row(run) for run in runs]
    st.dataframe(frame(rows, _COLUMNS), hide_index=True, width="stretch")
    ids = [run["id"] for run in runs]
    chosen = st.selectbox(
        "Run", ids, key="federated_run",
        format_func=lambda i: _label(next(r for r in runs if r["id"] == i)),
    )  # fmt: skip
    live(api, lambda a: _detail(a, int(chosen)))


def _row(run: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": run["id"], "model": run["model"], "base version": run["base_version"],
        "state": run["state"], "rounds": f"{run['rounds_done']}/{run['rounds']}",
        "result version": run.get("result_version"),
        "INT8 version": run.get("result_int8_version"), "rollout": run.get("rollout_id"),
        "created": when(run.get("created_at")), "finished": when(run.get("finished_at")),
        "reason": run.get("reason") or "",
    }  # fmt: skip


def _label(run: dict[str, Any]) -> str:
    return f"#{run['id']} {run['model']}:{run['base_version']} ({run['state']})"


def round_table(run: dict[str, Any]) -> pd.DataFrame:
    """One row per finished round: the series the charts draw, bytes as MB."""
    rows = []
    for entry in run.get("round_metrics") or []:
        row: dict[str, Any] = {"round": entry["round"], "examples": entry["examples"]}
        row |= {label: entry[name] for name, label in (_TRAINING | _CLIENTS).items()}
        row |= {label: entry[name] / 1e6 for name, label in _TRAFFIC.items()}
        row["wall s"] = entry["wall_s"]
        rows.append(row)
    return pd.DataFrame(rows)


def _detail(api: ApiClient, run_id: int) -> None:
    run = api.get(f"{RUNS_PATH}/{run_id}")
    top = st.columns(4)
    top[0].metric("State", run["state"])
    top[1].metric("Rounds", f"{run['rounds_done']} of {run['rounds']}")
    top[2].metric("Result version", _or_dash(run.get("result_version")))
    top[3].metric("On devices (INT8)", _or_dash(run.get("result_int8_version")))
    if run.get("reason"):
        st.caption(f"Why: {run['reason']}")
    # The API says whether a cancel would stop it (not once it is FINALIZING).
    if run.get("cancellable") and st.button("Cancel run", key=f"federated_cancel_{run_id}"):
        _cancel(api, run_id)
    rounds = round_table(run)
    if rounds.empty:
        st.info("No round has finished yet.")
    else:
        left, right = st.columns(2)
        left.caption("Training loss per round")
        left.line_chart(rounds, x="round", y=list(_TRAINING.values()), height=220)
        right.caption("Clients per round")
        right.bar_chart(rounds, x="round", y=list(_CLIENTS.values()), height=220)
        st.caption("Model traffic per round (MB)")
        st.bar_chart(rounds, x="round", y=list(_TRAFFIC.values()), height=200)
        st.dataframe(rounds, hide_index=True, width="stretch")
    if run.get("metrics"):
        with st.expander("Gate scores and timings"):
            st.json(run["metrics"])


def _cancel(api: ApiClient, run_id: int) -> None:
    try:
        after = api.post(f"{RUNS_PATH}/{run_id}/cancel")
    except ApiError as exc:  # 409: it finished meanwhile; the message says so
        st.error(str(exc))
        return
    st.session_state["federated_note"] = f"Run #{run_id} is {after['state']}."
    st.rerun()


def _or_dash(value: Any) -> str:
    return "—" if value is None else str(value)
