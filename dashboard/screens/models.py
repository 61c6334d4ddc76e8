"""The Models page (a script st.navigation runs; its view is dashboard.views.models)."""

from dashboard.ui import run_page
from dashboard.views.models import render

run_page("Models", render)
