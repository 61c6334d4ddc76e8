"""The Flower ServerApp of every federated run: reads the run's plan from its directory (run
config ``run-dir``), runs the rounds, and leaves the outcome there for the coordinator.

It runs in a `flwr-serverapp` process that the SuperLink's SuperExec starts; whatever
happens, it writes an outcome (FAILED with the reason when something broke), so the cloud
never waits on a run that has ended.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from cloud.federated.plan import Outcome, RunFiles
from cloud.federated.rounds import run_rounds

__all__ = ["app"]

_LOGGER = logging.getLogger(__name__)

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = context.run_config.get("run-dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ValueError("this Flower App needs the run config run-dir (edgefleet submits it)")
    files = RunFiles(Path(run_dir))
    try:
        plan = files.read_plan()
        outcome = run_rounds(grid, plan, files)
    except Exception as exc:
        _LOGGER.exception("federated run in %s failed", run_dir)
        files.write_outcome(Outcome(state="FAILED", reason=f"{type(exc).__name__}: {exc}"[:2000]))
        raise
    _LOGGER.info("federated run in %s ended %s: %s", run_dir, outcome.state, outcome.reason)
