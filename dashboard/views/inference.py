"""Inference: how the fleet (or a labelled part of it, or one device) answers over time:
offload to the cloud, the cloud's offload budget, degraded answers, errors and latency
percentiles, from the history the cloud keeps per device per minute."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, NotFound
from dashboard.ui import device_id as checked_device_id
from dashboard.ui import history as read_history
from dashboard.ui import (
    live,
    not_available,
    optional,
    percent,
    summary_cached,
    time_range,
    when,
)

__all__ = ["BUDGET_PATH", "render"]

BUDGET_PATH = "/v1/inference/budget"
_ANY = "any"


def render(api: ApiClient) -> None:
    summary = summary_cached(api)
    cols = st.columns(4)
    scope = cols[0].radio("Scope", ["Fleet", "One device"], key="inference_scope", horizontal=True)
    with cols[1]:
        span = time_range("inference_range")
    if scope == "Fleet":
        labels = [f"{k}={v}" for k, values in summary["labels"].items() for v in values]
        label = cols[2].selectbox("Label", [_ANY, *labels], key="inference_label")
        models = sorted(
            {v.rpartition(":")[0] for v in summary["versions"]} | set(summary["versions"])
        )
        model = cols[3].selectbox("Model", [_ANY, *models], key="inference_model")
        params: dict[str, Any] = {}
        if label != _ANY:
            params["label"] = label
        if model != _ANY:
            params["model"] = model
        path = "/v1/history/fleet"
    else:
        typed = cols[2].text_input("Device id", key="inference_device").strip()
        if not typed:
            st.caption("Type a device id to see its history.")
            return
        if (device_id := checked_device_id(typed)) is None:
            return
        params, path = {}, f"/v1/devices/{device_id}/history"
    live(api, lambda a: _charts(a, path, params, span))


def _charts(api: ApiClient, path: str, params: dict[str, Any], span: timedelta) -> None:
    try:
        # Ending now at each refresh (a long range is read again less often: ui.history).
        history = read_history(api, path, params, span)
    except NotFound as exc:
        st.warning(exc.message)
        return
    totals = history["totals"]
    cols = st.columns(6)
    cols[0].metric("Requests", f"{totals['requests']:,}")
    cols[1].metric("Offload rate", percent(totals["offload_rate"]))
    cols[2].metric("Cloud rows", percent(totals["cloud_rate"]))
    cols[3].metric("Degraded rate", percent(totals["degraded_rate"]))
    cols[4].metric("Error rate", percent(totals["error_rate"]))
    cols[5].metric("p95 latency", _ms(totals["p95_ms"]))
    _budget(api)
    if not history["points"]:
        st.info("No telemetry in this range.")
        return
    points = pd.DataFrame(history["points"])
    points["t"] = pd.to_datetime(points["t"])
    st.caption(
        f"{totals['devices']} devices reported; buckets of {history['step_s'] // 60} min "
        f"(rates are shares of rows; errors of requests)"
    )
    left, right = st.columns(2)
    with left:
        st.caption("Offload, cloud, degraded and error rates")
        st.line_chart(
            points, x="t", y=["offload_rate", "cloud_rate", "degraded_rate", "error_rate"],
            height=260,
        )  # fmt: skip
    with right:
        st.caption("Latency percentiles (ms)")
        st.line_chart(points, x="t", y=["p50_ms", "p95_ms", "p99_ms"], height=260)
    st.caption("Requests per bucket")
    st.bar_chart(points, x="t", y="requests", height=200)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} ms"


def _budget(api: ApiClient, path: str = BUDGET_PATH) -> None:
    """GET /v1/inference/budget: {enabled, queue_bound_ms, budget: {max_offload, reason,
    until, ...} | null, saturated_replicas}."""
    view = optional(api, path)
    if view is None:
        not_available("The cloud offload budget", path)
        return
    budget = view.get("budget") if isinstance(view, dict) else None
    saturated = view.get("saturated_replicas") or [] if isinstance(view, dict) else []
    if isinstance(view, dict) and view.get("enabled") is False:
        st.caption("Cloud offload budget: turned off on this cloud.")
    elif not isinstance(budget, dict) or budget.get("max_offload") is None:
        st.caption("Cloud offload budget: none in force (the inference service keeps up).")
    else:
        reason = budget.get("reason") or "the inference service is saturated"
        until = when(budget.get("until")) if budget.get("until") else "further notice"
        st.warning(
            f"Cloud offload budget in force: devices offload at most "
            f"{percent(budget['max_offload'])} of their rows ({reason}), until {until}."
        )
    if saturated:
        st.caption(f"Saturated inference replicas: {', '.join(map(str, saturated))}")
