"""The dashboard's entry point (`edgefleet dashboard` runs `streamlit run` on this file): the
pages, each a script under ``pages/`` that renders a view of ``dashboard.views``."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

__all__: list[str] = []

_PAGES = Path(__file__).parent / "pages"

st.set_page_config(page_title="EdgeFleet", page_icon="🛰️", layout="wide")
st.navigation(
    [
        st.Page(_PAGES / "fleet.py", title="Fleet", url_path="fleet", default=True),
        st.Page(_PAGES / "models.py", title="Models", url_path="models"),
        st.Page(_PAGES / "rollouts.py", title="Rollouts", url_path="rollouts"),
        st.Page(_PAGES / "inference.py", title="Inference", url_path="inference"),
        st.Page(_PAGES / "federated.py", title="Federated", url_path="federated"),
    ]
).run()
