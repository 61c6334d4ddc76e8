"""The Inference page (a script st.navigation runs; its view is dashboard.views.inference)."""

from dashboard.ui import run_page
from dashboard.views.inference import render

run_page("Inference", render)
