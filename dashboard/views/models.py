"""Models: each model's versions with their lineage (which version each was made from),
precision, size and accuracy (INT8 against its FP32 parent), and a version's routing
calibration curve (the threshold a device uses for each share of offloaded inputs)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from dashboard.client import ApiClient
from dashboard.ui import frame, percent, when

__all__ = ["lineage_dot", "render", "version_rows"]

_COLUMNS = [
    "version", "parent", "precision", "size (KiB)", "size vs parent", "accuracy",
    "parent accuracy", "drop (pt)", "routing", "source", "created",
]  # fmt: skip


def render(api: ApiClient) -> None:
    models = api.get("/v1/models")
    if not models:
        st.info("No models registered yet (`edgefleet model add`, or `make demo`).")
        return
    names = [m["name"] for m in models]
    st.dataframe(
        frame(
            [
                {"model": m["name"], "task": m["task"], "latest version": m["latest_version"],
                 "created": when(m["created_at"]), "description": m["description"]}
                for m in models
            ],
            ["model", "task", "latest version", "created", "description"],
        ),
        hide_index=True,
        width="stretch",
    )  # fmt: skip
    # The model with the most versions first: the one with a lineage worth looking at.
    busiest = max(range(len(models)), key=lambda i: models[i]["latest_version"] or 0)
    name = str(st.selectbox("Model", names, index=busiest, key="models_name"))
    versions = api.get(f"/v1/models/{name}/versions")
    if not versions:
        st.info(f"{name} has no versions yet.")
        return
    st.subheader(f"{name}: {len(versions)} versions")
    st.dataframe(frame(version_rows(versions), _COLUMNS), hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        st.caption("Lineage (an arrow goes from a version to the one made from it)")
        st.graphviz_chart(lineage_dot(name, versions))
    with right:
        _accuracy(versions)
    _calibration(versions)


def version_rows(versions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_number = {v["version"]: v for v in versions}
    rows = []
    for v in versions:
        metrics = v.get("metrics") or {}
        parent = by_number.get(v["parent_version"])
        routing = v.get("routing") or {}
        threshold = routing.get("threshold")
        rows.append(
            {
                "version": v["version"],
                "parent": v["parent_version"] if v["parent_version"] is not None else "—",
                "precision": v["precision"].upper(),
                "size (KiB)": round(v["size"] / 1024, 1),
                "size vs parent": f"{v['size'] / parent['size']:.2f}x" if parent else "—",
                "accuracy": percent(_number(metrics.get("accuracy"))),
                "parent accuracy": percent(_number(metrics.get("parent_accuracy"))),
                "drop (pt)": _text(_number(metrics.get("accuracy_drop_pt"))),
                "routing": (
                    f"{routing['policy']} < {threshold:.3f}"
                    if threshold is not None
                    else routing.get("policy", "—")
                ),
                "source": v["source"],
                "created": when(v["created_at"]),
            }
        )
    return rows


def _threshold(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "—"


def _text(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) else None


def lineage_dot(name: str, versions: list[dict[str, Any]]) -> str:
    lines = ["digraph lineage {", "rankdir=LR;", 'node [shape=box, fontname="sans-serif"];']
    for v in versions:
        label = f"{name}:{v['version']}\\n{v['precision'].upper()}, {v['size'] / 1024:.0f} KiB"
        lines.append(f'v{v["version"]} [label="{label}"];')
        if v["parent_version"] is not None:
            lines.append(f"v{v['parent_version']} -> v{v['version']};")
    lines.append("}")
    return "\n".join(lines)


def _accuracy(versions: list[dict[str, Any]]) -> None:
    """Each INT8 version against its FP32 parent, on the gate's held-out data."""
    rows = []
    for v in versions:
        metrics = v.get("metrics") or {}
        child, parent = _number(metrics.get("accuracy")), _number(metrics.get("parent_accuracy"))
        if child is not None and parent is not None:
            label = f"v{v['parent_version']} → v{v['version']}"
            rows.append({"pair": label, "precision": "FP32 (parent)", "accuracy": parent})
            rows.append({"pair": label, "precision": v["precision"].upper(), "accuracy": child})
    st.caption("Accuracy: INT8 against its FP32 parent (held-out data of the gate)")
    if not rows:
        st.info("No version was gated against a parent yet.")
        return
    st.bar_chart(
        pd.DataFrame(rows), x="pair", y="accuracy", color="precision", stack=False, height=240
    )
    for v in versions:
        metrics = v.get("metrics") or {}
        child, parent = _number(metrics.get("accuracy")), _number(metrics.get("parent_accuracy"))
        if child is not None and parent is not None:
            st.caption(
                f"v{v['parent_version']} → v{v['version']}: FP32 {percent(parent)}, "
                f"{v['precision'].upper()} {percent(child)} "
                f"({_text(_number(metrics.get('accuracy_drop_pt')))} pt lost)"
            )


def _calibration(versions: list[dict[str, Any]]) -> None:
    calibrated = [v for v in versions if (v.get("routing") or {}).get("curve")]
    st.subheader("Routing calibration")
    if not calibrated:
        st.info("No version of this model carries a calibration curve.")
        return
    numbers = [v["version"] for v in calibrated]
    chosen = st.selectbox("Version", numbers, index=len(numbers) - 1, key="models_curve_version")
    version = next(v for v in calibrated if v["version"] == chosen)
    routing = version["routing"]
    curve = pd.DataFrame(routing["curve"])
    st.caption(
        f"{routing['policy']}: the threshold that offloads each share of the calibration split "
        f"(shipped: {_threshold(routing.get('threshold'))}, target {routing.get('target') or '—'})"
    )
    st.line_chart(curve, x="offload", y="threshold", height=260)
    report = (version.get("calibration") or {}).get("policies") or {}
    if report:
        rows = [
            {"policy": policy, "threshold": entry.get("threshold"),
             "offload": percent(_number(entry.get("offload"))),
             "joint accuracy": percent(_number(entry.get("accuracy")))}
            for policy, entry in report.items()
        ]  # fmt: skip
        st.dataframe(
            frame(rows, ["policy", "threshold", "offload", "joint accuracy"]),
            hide_index=True,
            width="stretch",
        )
