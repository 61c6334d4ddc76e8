"""The cloud never imports the edge agent: the demo runs agents as `edge-agent` processes."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CLOUD = Path(__file__).resolve().parents[2] / "cloud"


def test_the_cloud_cli_and_launcher_load_no_edge_agent_module() -> None:
    """`edgefleet serve` used to load the agent through the demo's fleet module."""
    code = (
        "import json, sys; import cloud.cli, cloud.launcher; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'edge_agent')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(done.stdout) == []


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names.add(str(node.args[0].value))
    return names


def test_no_file_under_cloud_imports_edge_agent() -> None:
    offenders = {
        str(path.relative_to(CLOUD.parent)): sorted(
            m for m in _imported_modules(path) if m.split(".")[0] == "edge_agent"
        )
        for path in sorted(CLOUD.rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    assert len(offenders) > 20  # the walk did see the package
