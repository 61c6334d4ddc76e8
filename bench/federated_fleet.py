"""B6's fleet: device folders as the agent leaves them (a model installed through the real
ModelStore, a sample buffer), their SuperNodes under the agent's supervisor, a run submitted
as the coordinator submits it, and the whole loop through `run_cloud` with real agents."""

from __future__ import annotations

import os
import queue
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from cloud.context import CloudContext
from cloud.demo.agents import LocalAgents, agent_command
from cloud.demo.federated import send_feedback
from cloud.embedded.processes import free_port
from cloud.federated.bundle import write_app
from cloud.federated.drift import device_shards
from cloud.federated.flower import FlowerCli, flower_command
from cloud.federated.head import find_head
from cloud.federated.plan import Outcome, RunFiles, RunPlan, TrainSettings
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from cloud.launcher import run_cloud
from cloud.pipeline.evaluate import run_model
from cloud.pipeline.reference.build import register_reference
from cloud.settings import CloudSettings
from edge_agent.federated.local import BUFFER_FILE
from edge_agent.federated.supervisor import (
    SupernodeConfig,
    SupernodeState,
    SupernodeSupervisor,
    write_node_config,
)
from edge_agent.model_store import Installed, ModelStore
from edge_agent.samples import LabelSource, SampleBuffer
from shared.messages import ArtifactRef, Manifest, TensorSpec

__all__ = ["Devices", "base_head", "canary_timing", "embeddings", "submit"]

MODEL = "digits-edge"
TRAINABLE = ["head.weight", "head.bias"]


def embeddings(model: bytes, x: np.ndarray) -> np.ndarray:
    return run_model(model, {"input": x.astype(np.float32)}, output="embedding")


def base_head(model: bytes) -> dict[str, np.ndarray]:
    return find_head(model, TRAINABLE, "embedding").arrays


def _install(data_dir: Path, model: bytes) -> None:
    store = ModelStore(data_dir / "store")
    ref = ArtifactRef.of(model, 64 * 1024)
    for index in range(len(ref.chunks)):
        store.write_chunk(ref, index, model[index * ref.chunk_size : (index + 1) * ref.chunk_size])
    store.finish(ref)
    store.activate(
        Installed(
            Manifest(
                model=MODEL, version=1, precision="fp32", artifact=ref,
                inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
                outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
                         TensorSpec(name="embedding", datatype="FP32", shape=[-1, 32])],
                trainable=TRAINABLE,
            )
        )
    )  # fmt: skip


class Devices:
    def __init__(
        self,
        root: Path,
        model: bytes,
        shards: list[tuple[np.ndarray, np.ndarray]],
        superlink: str,
    ) -> None:
        self.ids = [f"dev-{i}" for i in range(len(shards))]
        self.supervisors: list[SupernodeSupervisor] = []
        self.configs = []
        for device_id, (x, y) in zip(self.ids, shards, strict=True):
            data_dir = root / device_id
            _install(data_dir, model)
            buffer = SampleBuffer(data_dir / BUFFER_FILE, max_samples=100_000, max_bytes=1 << 30)
            buffer.add(MODEL, 1, {"input": x}, y.tolist(), LabelSource.FEEDBACK)
            buffer.close()
            self.configs.append(
                SupernodeConfig(
                    command=[flower_command("flower-supernode")], superlink=superlink,
                    node_config_file=write_node_config(
                        data_dir / "flower" / "node.toml", device_id=device_id, data_dir=data_dir
                    ),
                    home=data_dir / "flower", log_path=data_dir / "supernode.log",
                    insecure=True, connect_timeout_s=120,
                )
            )  # fmt: skip

    def start(self, *, timeout: float) -> float:
        """Start every SuperNode; seconds until all are connected."""
        started = time.monotonic()
        self.supervisors = [SupernodeSupervisor(c) for c in self.configs]
        for supervisor in self.supervisors:
            supervisor.start()
        while not all(s.status().state is SupernodeState.CONNECTED for s in self.supervisors):
            if time.monotonic() - started > timeout:
                raise RuntimeError("the SuperNodes did not all connect")
            time.sleep(0.2)
        return time.monotonic() - started

    def wait_outcome(self, files: RunFiles, *, timeout: float) -> Outcome:
        deadline = time.monotonic() + timeout
        while (outcome := files.read_outcome()) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no outcome within {timeout:g}s")
            time.sleep(0.2)
        return outcome

    def stop(self) -> None:
        for supervisor in self.supervisors:
            supervisor.stop()


def submit(
    cli: FlowerCli, cloud_dir: Path, devices: list[str], rounds: int, model: bytes, epochs: int
) -> tuple[RunFiles, str]:
    """What the coordinator does for a run: plan and base head in its folder, `flwr run`."""
    files = RunFiles(cloud_dir / "federated" / "runs" / "1")
    files.write_plan(
        RunPlan(
            run_id=1, model=MODEL, base_version=1, versions=[1], devices=devices,
            rounds=rounds, min_clients=len(devices), min_samples=20,
            wait_for_clients_s=300, round_timeout_s=300,
            train=TrainSettings(epochs=epochs, seed=3), weight_name="head.weight",
            bias_name="head.bias", embedding_output="embedding",
        )
    )  # fmt: skip
    files.write_head("base", base_head(model))
    config = files.root / "run-config.toml"
    config.write_text(f'run-dir = "{files.root}"\n')
    return files, cli.run(write_app(cloud_dir / "federated" / "app"), config)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise RuntimeError(f"timed out waiting for {what}")


def canary_timing(root: Path, *, agents: int, rounds: int) -> dict[str, Any]:
    """The loop as `edgefleet demo --federated` runs it, timed from POST to canary ACTIVE."""
    os.environ["EDGEFLEET_FEDERATED_PORT"] = str(free_port())
    os.environ["EDGEFLEET_FEDERATED_INTERNAL_PORT"] = str(free_port())
    federated = FederatedSettings()
    settings = CloudSettings(dev_mode=True, data_dir=root, api_port=0)
    stop = threading.Event()
    ready: queue.Queue[tuple[CloudContext, str]] = queue.Queue()
    cloud = threading.Thread(
        target=run_cloud,
        kwargs={"settings": settings, "stop": stop,
                "on_ready": lambda context, url, _stop: ready.put((context, url))},
        daemon=True,
    )  # fmt: skip
    cloud.start()
    context, url = ready.get(timeout=300)
    link = SuperLink(federated, data_dir=root, dev_mode=True)
    link.start()
    command = agent_command()
    assert command is not None
    env = {
        "EDGEFLEET_AGENT_FEDERATED": "true",
        "EDGEFLEET_AGENT_FEDERATED_SUPERLINK": federated.fleet_address,
        "EDGEFLEET_AGENT_FEDERATED_INSECURE": "true",
        "EDGEFLEET_AGENT_TELEMETRY_INTERVAL_S": "1",
    }
    fleet = LocalAgents(
        command=command, api_url=url, admin_token=settings.admin_token, data_dir=root,
        count=agents, extra_env=env,
    )  # fmt: skip
    admin = httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {settings.admin_token}"}, timeout=60
    )
    try:
        register_reference(context, names=[MODEL], actor="bench")
        fleet.start(stop)
        revs = fleet.deploy(MODEL, 2)
        if len(fleet.wait_active(MODEL, 2, revs, stop, 120)) != agents:
            raise RuntimeError("the agents did not activate digits-edge:2")
        for agent, (x, y) in zip(fleet.agents, device_shards(agents, per_device=200), strict=True):
            assert agent.api_url is not None
            send_feedback(agent.api_url, x, y)

        def connected(device_id: str) -> bool:
            live = admin.get(f"/v1/devices/{device_id}/live").json()
            learning = (live.get("telemetry") or {}).get("learning") or {}
            return learning.get("supernode") == "connected"

        _wait(lambda: all(connected(a.device_id) for a in fleet.agents), 180, "SuperNodes")
        started = time.monotonic()
        run = admin.post("/v1/federated/runs", json={
            "model": MODEL, "rounds": rounds, "min_clients": agents, "selector": {"fleet": "demo"},
            "rollout": {"canary": 1, "device_timeout_s": 300},
            "gate": {"max_drop_pt": 5.0},
        }).json()  # fmt: skip
        done = _wait(
            lambda: (r := admin.get(f"/v1/federated/runs/{run['id']}").json())["state"]
            not in ("PENDING", "RUNNING", "FINALIZING") and r, 1800, "the run",
        )  # fmt: skip
        registered_s = time.monotonic() - started
        if done["state"] != "COMPLETED":
            raise RuntimeError(f"the run ended {done['state']}: {done['reason']}")

        def canary_active() -> bool:
            targets = admin.get(f"/v1/rollouts/{done['rollout_id']}/targets").json()["items"]
            return any(t["wave"] == 0 and t["state"] == "ACTIVE" for t in targets)

        _wait(canary_active, 300, "the canary")
        active_s = time.monotonic() - started
        rounds_s = sum(r["wall_s"] for r in done["round_metrics"])
        stamps = {k: datetime.fromisoformat(done[k]) for k in ("created_at", "submitted_at",
                                                               "finished_at")}  # fmt: skip
        last_round = datetime.fromisoformat(done["round_metrics"][-1]["at"])
        return {
            "submit_s": round((stamps["submitted_at"] - stamps["created_at"]).total_seconds(), 1),
            "finalize_s": round((stamps["finished_at"] - last_round).total_seconds(), 1),
            "agents": agents, "rounds": rounds, "start_to_registered_s": round(registered_s, 1),
            "start_to_canary_active_s": round(active_s, 1), "rounds_wall_s": round(rounds_s, 1),
            "identify_s": done["round_metrics"][0]["detail"].get("waited_s"),
        }  # fmt: skip
    finally:
        admin.close()
        fleet.stop()
        link.stop()
        stop.set()
        cloud.join(60)
        os.environ.pop("EDGEFLEET_FEDERATED_PORT", None)
        os.environ.pop("EDGEFLEET_FEDERATED_INTERNAL_PORT", None)
