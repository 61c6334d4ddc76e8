"""The Federated page (a script st.navigation runs; its view is dashboard.views.federated)."""

from dashboard.ui import run_page
from dashboard.views.federated import render

run_page("Federated", render)
