"""`pip install .[edge]` stays light: no SQLAlchemy, Redis, Streamlit or torch, and the
agent runs without them."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("sqlalchemy", "redis", "streamlit", "torch", "fastapi", "alembic", "flwr")


def test_the_edge_extra_names_nothing_of_the_cloud() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["edge"]
    names = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in wanted}
    assert not names & set(FORBIDDEN)
    assert {"onnxruntime", "paho-mqtt", "numpy", "httpx", "pydantic"} <= names


def test_the_agent_runs_with_cloud_packages_made_unimportable(tmp_path: Path) -> None:
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN!r}:
            raise ImportError('blocked on a device: ' + name)
sys.meta_path.insert(0, Block())
from shared.signing import generate_key, public_key_b64
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
import edge_agent.cli
agent = Agent(AgentSettings(device_id='light', token='t' * 16, cloud_url='http://127.0.0.1:9',
    mqtt_url='mqtt://127.0.0.1:9', public_key=public_key_b64(generate_key().public_key()),
    data_dir={str(tmp_path)!r}, api_port=0))
agent.start()
agent.stop()
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def test_an_agent_with_learning_on_imports_no_flower(tmp_path: Path) -> None:
    """The SuperNode is a process of its own: the agent supervises it without importing
    Flower (whose requirements are the cloud's), even with federated learning on."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN!r}:
            raise ImportError('blocked on a device: ' + name)
sys.meta_path.insert(0, Block())
from shared.signing import generate_key, public_key_b64
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
agent = Agent(AgentSettings(device_id='light', token='t' * 16, cloud_url='http://127.0.0.1:9',
    mqtt_url='mqtt://127.0.0.1:9', public_key=public_key_b64(generate_key().public_key()),
    data_dir={str(tmp_path)!r}, api_port=0, federated=True,
    federated_superlink='127.0.0.1:9', federated_insecure=True,
    federated_supernode={str(tmp_path / "no-supernode")!r}))
agent.start()
state = agent.learning.state()
agent.stop()
print('ok', state.samples, state.capacity)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 0 2000"


def test_the_federated_extra_adds_flower_to_the_edge_extra() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert extras["edge-federated"] == ["edgefleet[edge]", "flwr==1.41.0"]
