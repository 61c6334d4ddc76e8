"""The Rollouts page (a script st.navigation runs; its view is dashboard.views.rollouts)."""

from dashboard.ui import run_page
from dashboard.views.rollouts import render

run_page("Rollouts", render)
