"""The Flower App every federated run is built from: a ``pyproject.toml`` naming the ServerApp
(``cloud.federated.server_app``) and the ClientApp (``edge_agent.federated.client_app``).

The FAB that `flwr run` builds from it holds only that file: both apps are code of this
installation, imported where they run (the SuperLink's host, each device's agent), never
shipped in a bundle or installed at run time. Bumping ``APP_VERSION`` is how a change to
what the two sides say to each other shows in every run's FAB.
"""

from __future__ import annotations

from pathlib import Path

from shared.fsutil import atomic_write

__all__ = ["APP_VERSION", "CLIENT_APP", "SERVER_APP", "write_app"]

APP_VERSION = "1.0.0"
SERVER_APP = "cloud.federated.server_app:app"
CLIENT_APP = "edge_agent.federated.client_app:app"

_PYPROJECT = f"""\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgefleet-federated"
version = "{APP_VERSION}"
description = "EdgeFleet: federated update of a model's classifier head"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "edgefleet"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{CLIENT_APP}"

[tool.flwr.app.config]
run-dir = ""
"""


def write_app(folder: Path) -> Path:
    """The app folder (created or refreshed), ready for `flwr run`."""
    folder.mkdir(parents=True, exist_ok=True)
    pyproject = folder / "pyproject.toml"
    if not pyproject.is_file() or pyproject.read_text() != _PYPROJECT:
        atomic_write(pyproject, _PYPROJECT.encode())
    return folder
