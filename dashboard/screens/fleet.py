"""The Fleet page (a script st.navigation runs; its view is dashboard.views.fleet)."""

from dashboard.ui import run_page
from dashboard.views.fleet import render

run_page("Fleet", render)
