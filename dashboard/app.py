"""The dashboard's entry point (`edgefleet dashboard` runs `streamlit run` on this file): the
pages, each a script under ``screens/`` that renders a view of ``dashboard.views``."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

__all__: list[str] = []

# Not "pages/": Streamlit would serve a script there as a page of its own, without this
# navigation, to a browser that opens its URL first.
_SCREENS = Path(__file__).parent / "screens"

st.set_page_config(page_title="EdgeFleet", page_icon="🛰️", layout="wide")
st.navigation(
    [
        st.Page(_SCREENS / "fleet.py", title="Fleet", default=True),  # at the root URL
        st.Page(_SCREENS / "models.py", title="Models", url_path="models"),
        st.Page(_SCREENS / "rollouts.py", title="Rollouts", url_path="rollouts"),
        st.Page(_SCREENS / "inference.py", title="Inference", url_path="inference"),
        st.Page(_SCREENS / "federated.py", title="Federated", url_path="federated"),
    ]
).run()
