"""The Streamlit dashboard as a child process (in a session of its own, like the embedded
broker and Redis): started by `edgefleet dashboard` and by the demo, stopped with them. The
API URL and admin token reach it through its environment, never its command line (``ps``
shows that to every user)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import httpx

from cloud.embedded.processes import ChildProcess, free_port, port_open
from shared.errors import ServiceUnavailable

__all__ = ["DEFAULT_PORT", "DashboardProcess", "dashboard_app"]

DEFAULT_PORT = 8501
_START_TIMEOUT_S = 60.0


def dashboard_app() -> Path | None:
    """The dashboard's Streamlit script, or None when the `dashboard` extra is missing."""
    if importlib.util.find_spec("streamlit") is None:
        return None
    spec = importlib.util.find_spec("dashboard")
    if spec is None or spec.origin is None:
        return None
    app = Path(spec.origin).parent / "app.py"
    return app if app.is_file() else None


class DashboardProcess:
    """`streamlit run dashboard/app.py`, headless, on ``host:port`` (``port`` 0, or a port
    already taken when ``fallback`` allows: a free one)."""

    def __init__(
        self,
        *,
        api_url: str,
        token: str,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        log_path: Path | None = None,
        refresh_s: float | None = None,
        fallback: bool = True,
    ) -> None:
        app = dashboard_app()
        if app is None:
            raise ServiceUnavailable(
                "the dashboard needs Streamlit: pip install -e '.[dashboard]' (or '.[all]')"
            )
        if port == 0 or (fallback and port_open(host, port)):
            port = free_port(host)
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_DASHBOARD_")}
        env |= {
            "EDGEFLEET_DASHBOARD_API_URL": api_url,
            "EDGEFLEET_DASHBOARD_TOKEN": token,
            "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false",
        }
        if refresh_s is not None:
            env["EDGEFLEET_DASHBOARD_REFRESH_S"] = str(refresh_s)
        self.child = ChildProcess(
            [
                sys.executable, "-m", "streamlit", "run", str(app),
                "--server.headless", "true",
                "--server.address", host,
                "--server.port", str(port),
                "--server.fileWatcherType", "none",
                "--browser.gatherUsageStats", "false",
                # A failure the pages did not catch shows a line, never a traceback.
                "--client.showErrorDetails", "none",
                "--client.toolbarMode", "viewer",
            ],
            log_path=log_path,
            env=env,
        )  # fmt: skip

    def start(self, timeout: float = _START_TIMEOUT_S) -> None:
        """Return once Streamlit answers its health check."""
        self.child.spawn()
        try:
            self.child.wait_until(self.healthy, timeout=timeout, what="the dashboard")
        except BaseException:
            self.child.stop()
            raise

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/_stcore/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self.child.running

    def exit_code(self) -> int | None:
        return self.child.exit_code()

    def stop(self) -> None:
        self.child.stop()
