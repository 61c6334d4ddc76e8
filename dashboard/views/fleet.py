"""Fleet: counts at a glance (online, offline, degraded), devices by deployment state and model
version, a filtered page of the device table, and one device's state, history and events.
Two API calls per refresh whatever the fleet's size (summary, one page), three more for the
device an operator opens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient, NotFound
from dashboard.ui import device_id as checked_device_id
from dashboard.ui import frame, live, percent, summary_cached, when

__all__ = ["PAGE_SIZE", "device_filters", "render"]

PAGE_SIZE = 50
_ANY = "any"
_SEEN = {
    _ANY: None,
    "within 5 minutes": ("after", timedelta(minutes=5)),
    "within the hour": ("after", timedelta(hours=1)),
    "not for an hour": ("before", timedelta(hours=1)),
    "never": ("never", None),
}
_COLUMNS = ["id", "presence", "degraded", "models", "deployment", "last seen", "labels"]


def render(api: ApiClient) -> None:
    everything = summary_cached(api)
    chosen = _filters(everything)
    # The query is made at each refresh: "last seen within 5 minutes" is counted from now.
    live(api, lambda a: _overview(a, device_filters(*chosen)))
    st.divider()
    _device_detail(api)


def _filters(summary: dict[str, Any]) -> tuple[str, str, list[str], str, str]:
    """What the filters say: label, version, presence, last seen, text."""
    labels = [f"{k}={v}" for k, values in summary["labels"].items() for v in values]
    cols = st.columns(5)
    label = cols[0].selectbox("Label", [_ANY, *labels], key="fleet_label")
    version = cols[1].selectbox("Model version", [_ANY, *summary["versions"]], key="fleet_version")
    presence = cols[2].multiselect(
        "Presence", ["online", "offline", "stopped", "unknown"], key="fleet_presence"
    )
    seen = cols[3].selectbox("Last seen", list(_SEEN), key="fleet_seen")
    text = cols[4].text_input("Device id or name", key="fleet_text")
    return str(label), str(version), list(presence), str(seen), text


def device_filters(
    label: str, version: str, presence: list[str], seen: str, text: str
) -> dict[str, Any]:
    """The /v1/fleet/devices query for what the filters say."""
    params: dict[str, Any] = {}
    if label != _ANY:
        params["label"] = label
    if version != _ANY:
        model, _, number = version.rpartition(":")
        params["model"], params["version"] = model, number
    if presence:
        params["presence"] = presence
    rule = _SEEN.get(seen)
    if rule is not None:
        kind, span = rule
        if kind == "never":
            params["never_seen"] = "true"
        elif span is not None:
            params[f"seen_{kind}"] = (datetime.now(UTC) - span).isoformat()
    if text.strip():
        params["q"] = text.strip()
    return params


def _overview(api: ApiClient, params: dict[str, Any]) -> None:
    scope = {"label": params["label"]} if "label" in params else {}
    summary = api.get("/v1/fleet/summary", params=scope)
    presence = summary["presence"]
    cols = st.columns(5)
    cols[0].metric("Devices", summary["devices"])
    cols[1].metric("Online", presence.get("online", 0))
    cols[2].metric("Offline", presence.get("offline", 0) + presence.get("stopped", 0))
    cols[3].metric(
        "Degraded",
        summary["degraded"],
        help=f"served degraded answers or failed requests in the last "
        f"{summary['degraded_window_s'] // 60} minutes",
    )
    cols[4].metric("Never reported", presence.get("unknown", 0))
    left, right = st.columns(2)
    left.caption("Devices by latest deployment state")
    left.bar_chart(_counts(summary["deployment"], "state"), x="state", y="devices", height=220)
    right.caption("Devices by active model version")
    right.bar_chart(_counts(summary["versions"], "version"), x="version", y="devices", height=220)
    _device_table(api, params)


def _counts(counts: dict[str, int], name: str) -> pd.DataFrame:
    return pd.DataFrame({name: list(counts), "devices": list(counts.values())})


def _device_table(api: ApiClient, params: dict[str, Any]) -> None:
    page = int(st.session_state.get("fleet_page", 1))
    body = _page(api, params, page)
    pages = max(1, -(-body["total"] // PAGE_SIZE))
    if page > pages:  # the filters narrowed the list under the page the operator was on
        page = st.session_state["fleet_page"] = pages
        body = _page(api, params, page)
    rows = [
        {
            "id": d["id"],
            "presence": d["presence"],
            "degraded": "yes" if d["degraded"] else "",
            "models": ", ".join(f"{m}:{v}" for m, v in d["active"].items()),
            "deployment": (d["deployment"] or {}).get("state", ""),
            "last seen": when(d["last_seen_at"]),
            "labels": ", ".join(f"{k}={v}" for k, v in d["labels"].items()),
        }
        for d in body["items"]
    ]
    st.caption(f"{body['total']} devices match; page {min(page, pages)} of {pages}")
    st.dataframe(frame(rows, _COLUMNS), hide_index=True, width="stretch")
    st.number_input("Page", min_value=1, max_value=pages, step=1, key="fleet_page")


def _page(api: ApiClient, params: dict[str, Any], page: int) -> Any:
    query = {**params, "limit": PAGE_SIZE, "offset": (page - 1) * PAGE_SIZE, "sort": "id"}
    return api.get("/v1/fleet/devices", params=query)


def _device_detail(api: ApiClient) -> None:
    st.subheader("Device")
    typed = st.text_input("Device id", key="fleet_device", placeholder="e.g. cam-01").strip()
    if not typed:
        st.caption("Type a device id (from the table above) to see its history and events.")
        return
    if (device_id := checked_device_id(typed)) is None:
        return
    try:
        device = api.get(f"/v1/fleet/devices/{device_id}")
    except NotFound as exc:
        st.warning(exc.message)
        return
    event = device["deployment"] or {}
    cols = st.columns(4)
    cols[0].metric("Presence", device["presence"])
    cols[1].metric("Last seen", when(device["last_seen_at"]))
    cols[2].metric("Deployment", event.get("state", "—"))
    cols[3].metric("Degraded", "yes" if device["degraded"] else "no")
    models = ", ".join(f"{m}:{v}" for m, v in device["active"].items()) or "none"
    st.caption(f"Serving {models}; labels {device['labels'] or 'none'}")
    history = api.get(f"/v1/devices/{device_id}/history")
    totals = history["totals"]
    st.caption(
        f"Last hour: {totals['requests']} requests, offload {percent(totals['offload_rate'])}, "
        f"degraded {percent(totals['degraded_rate'])}, p95 {totals['p95_ms'] or '—'} ms"
    )
    if history["points"]:
        points = pd.DataFrame(history["points"])
        points["t"] = pd.to_datetime(points["t"])
        st.line_chart(points, x="t", y=["requests", "rows_hard", "errors"], height=220)
    _events(api, device_id)


def _events(api: ApiClient, device_id: str) -> None:
    cursors: list[str | None] = st.session_state.setdefault(f"events_{device_id}", [None])
    params: dict[str, Any] = {"limit": 20}
    if cursors[-1]:
        params["cursor"] = cursors[-1]
    response = api.request("GET", f"/v1/devices/{device_id}/events", params=params)
    events = response.json()
    st.caption(f"Deployment events, newest first (page {len(cursors)})")
    columns = ["at", "state", "model", "version", "rev", "rollout_id", "reason"]
    st.dataframe(frame(events, columns), hide_index=True, width="stretch")
    older, newer = st.columns(2)
    following = response.headers.get("X-Next-Cursor")
    if older.button("Older events", disabled=following is None, key="events_older"):
        cursors.append(following)
        st.rerun()
    if newer.button("Newer events", disabled=len(cursors) == 1, key="events_newer"):
        cursors.pop()
        st.rerun()
