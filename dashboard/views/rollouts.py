"""Rollouts: the list, one rollout's progress per wave as a chart and its devices' states
(a page at a time), the operator's pause / resume / abort, and a form to start one."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, ApiError, ApiUnreachable
from dashboard.ui import frame, live, when

__all__ = ["ACTIONS", "parse_selector", "render"]

# What each button asks for, and the states it applies to (cloud.rollout.store's commands).
ACTIONS: dict[str, tuple[str, ...]] = {
    "pause": ("IN_PROGRESS",),
    "resume": ("PAUSED",),
    "abort": ("IN_PROGRESS", "PAUSED"),
}
_TARGETS = 100
_LIST_COLUMNS = ["id", "model", "version", "state", "devices", "active", "failed", "created"]


def render(api: ApiClient) -> None:
    if note := st.session_state.pop("rollouts_note", None):
        st.success(note)
    rollouts = api.get("/v1/rollouts", params={"limit": 50})
    if rollouts:
        rows = [
            {**r, "active": r["states"].get("ACTIVE", 0), "failed": r["states"].get("FAILED", 0),
             "created": when(r["created_at"])}
            for r in rollouts
        ]  # fmt: skip
        st.dataframe(frame(rows, _LIST_COLUMNS), hide_index=True, width="stretch")
        ids = [r["id"] for r in rollouts]
        if (started := st.session_state.pop("rollouts_started", None)) in ids:
            st.session_state["rollouts_id"] = started  # before its selectbox exists
        chosen = st.selectbox(
            "Rollout", ids, key="rollouts_id",
            format_func=lambda i: _label(next(r for r in rollouts if r["id"] == i)),
        )  # fmt: skip
        live(api, lambda a: _detail(a, int(chosen)))
    else:
        st.info("No rollouts yet: start one below.")
    st.divider()
    _start_form(api)


def _label(rollout: dict[str, Any]) -> str:
    # No version: an undeploy (the model leaves the devices), where the cloud has those.
    what = (
        f"{rollout['model']}:{rollout['version']}"
        if rollout.get("version")
        else (f"undeploy {rollout['model']}")
    )
    return f"#{rollout['id']} {what} ({rollout['state']})"


def _detail(api: ApiClient, rollout_id: int) -> None:
    rollout = api.get(f"/v1/rollouts/{rollout_id}")
    state = rollout["state"]
    cols = st.columns(4)
    cols[0].metric("State", state)
    cols[1].metric("Wave", f"{rollout['current_wave'] + 1} of {rollout['waves']}")
    cols[2].metric("Devices", rollout["devices"])
    cols[3].metric("Active", rollout["states"].get("ACTIVE", 0))
    if rollout.get("reason"):
        st.caption(f"Reason: {rollout['reason']}")
    buttons = st.columns(len(ACTIONS))
    for column, (action, sources) in zip(buttons, ACTIONS.items(), strict=True):
        if column.button(
            action.capitalize(), key=f"rollout_{action}", disabled=state not in sources
        ):
            _command(api, rollout_id, action)
    _waves(rollout["progress"])
    _targets(api, rollout_id)


def _command(api: ApiClient, rollout_id: int, action: str) -> None:
    try:
        after = api.post(f"/v1/rollouts/{rollout_id}/{action}")
    except ApiError as exc:
        st.error(f"{action.capitalize()} refused: {exc.message}")
        return
    st.session_state["rollouts_note"] = f"Rollout {rollout_id}: {action} → {after['state']}"
    st.rerun(scope="app")  # the list above shows the new state too


def _waves(progress: list[dict[str, Any]]) -> None:
    st.caption("Progress per wave (devices by state)")
    rows = [
        {"wave": f"wave {p['wave']}" if p["wave"] else "canary", "state": s, "devices": n}
        for p in progress
        for s, n in p["states"].items()
    ]
    if not rows:
        st.info("No devices in this rollout.")
        return
    order = [f"wave {p['wave']}" if p["wave"] else "canary" for p in progress]
    st.vega_lite_chart(
        pd.DataFrame(rows),
        {
            "mark": {"type": "bar"},
            "encoding": {
                "x": {"field": "wave", "type": "nominal", "sort": order, "title": None},
                "y": {"field": "devices", "type": "quantitative", "stack": True},
                "color": {"field": "state", "type": "nominal"},
                "tooltip": [{"field": "wave"}, {"field": "state"}, {"field": "devices"}],
            },
        },
        height=260,
    )


def _targets(api: ApiClient, rollout_id: int) -> None:
    states = ["any", "PENDING", "DEPLOYING", "ACTIVE", "FAILED", "REVERTING", "REVERTED",
              "REVERT_FAILED", "SKIPPED"]  # fmt: skip
    left, right = st.columns(2)
    state = left.selectbox("Device state", states, key="rollout_target_state")
    page = int(right.number_input("Page", min_value=1, step=1, key="rollout_target_page"))
    params: dict[str, Any] = {"limit": _TARGETS, "offset": (page - 1) * _TARGETS}
    if state != "any":
        params["state"] = state
    body = api.get(f"/v1/rollouts/{rollout_id}/targets", params=params)
    st.caption(f"{body['total']} devices")
    rows = [{**t, "updated": when(t["updated_at"])} for t in body["items"]]
    st.dataframe(
        frame(rows, ["device_id", "wave", "state", "rev", "reason", "updated"]),
        hide_index=True,
        width="stretch",
    )


def parse_selector(text: str) -> dict[str, str]:
    """``site=lab, tier=canary`` (commas or new lines) as a label selector."""
    selector: dict[str, str] = {}
    for item in text.replace("\n", ",").split(","):
        if not item.strip():
            continue
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"{item.strip()!r} is not key=value")
        selector[key.strip()] = value.strip()
    return selector


def _start_form(api: ApiClient) -> None:
    st.subheader("Start a rollout")
    models = [m["name"] for m in api.get("/v1/models")]
    if not models:
        st.info("Register a model first.")
        return
    # Each start uses up its button: the next form's has a key of its own. A second click of
    # the same button (a double click) reaches Streamlit while the first one's run is going
    # on, and Streamlit replays it into the next run, which must not start a second rollout.
    used = int(st.session_state.setdefault("rollout_form_used", 0))
    with st.form("start_rollout"):
        cols = st.columns(3)
        model = cols[0].selectbox("Model", models, key="rollout_form_model")
        version = cols[1].number_input("Version", min_value=1, step=1, key="rollout_form_version")
        selector = cols[2].text_input("Devices with labels", placeholder="site=lab, tier=canary")
        knobs = st.columns(4)
        canary = knobs[0].number_input("Canary devices", min_value=1, value=1, step=1)
        growth = knobs[1].number_input("Wave growth", min_value=1.0, value=2.0, step=0.5)
        failure = knobs[2].number_input(
            "Abort at failure share", min_value=0.01, max_value=1.0, value=0.2, step=0.05
        )
        timeout = knobs[3].number_input("Device timeout (s)", min_value=1, value=600, step=30)
        submitted = st.form_submit_button("Start rollout", key=f"rollout_form_start_{used}")
    if not submitted:
        return
    try:
        labels = parse_selector(selector)
    except ValueError as exc:
        st.error(f"Devices with labels: {exc}")
        return
    # Before the request, and no Streamlit call in between: the run a second click
    # interrupts stops at a Streamlit call, so the click is used up before it can be replayed.
    st.session_state["rollout_form_used"] = used + 1
    body = {
        "model": model, "version": int(version), "selector": labels,
        "strategy": {"canary": int(canary), "growth": float(growth),
                     "failure_threshold": float(failure), "device_timeout_s": float(timeout)},
    }  # fmt: skip
    try:
        created = api.post("/v1/rollouts", body)
    except ApiUnreachable as exc:
        # No answer is not a no: the cloud may have started it before the answer was lost.
        st.error(
            f"No answer to the start of the rollout ({exc.message}); it may have started: "
            "look for it in the list before starting it again."
        )
        return
    except ApiError as exc:
        st.error(f"The rollout was not started: {exc.message}")
        return
    st.session_state["rollouts_note"] = (
        f"Rollout {created['id']} started: {created['devices']} devices in {created['waves']} waves"
    )
    st.session_state["rollouts_started"] = created["id"]
    st.rerun()
