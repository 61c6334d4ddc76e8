"""The closed loop, end to end (slow): two real agents serve the INT8 digits-edge model and run
their own SuperNodes; apps send them drifted, labelled digits on POST /v1/feedback; a
federated run started over REST trains the head for two rounds through a real SuperLink;
the cloud gates the result, registers FP32 and INT8 versions with their lineage, and the
canary device of the rollout it starts reports the new version ACTIVE."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.federated.coordinator import Coordinator
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from cloud.fleet.service import FleetService
from cloud.pipeline.reference.build import register_reference
from cloud.registry import repository
from cloud.registry.tables import Device
from edge_agent.agent import Agent
from tests.conftest import seed_reference_cache, serve_in_thread
from tests.federated_support import drifted_shards, wait_until
from tests.fleet_harness import Cloud, clear_retained

pytestmark = pytest.mark.federated

MODEL = "digits-edge"
PER_DEVICE = 150


@contextmanager
def _federated_cloud(context: CloudContext) -> Iterator[tuple[Cloud, Coordinator]]:
    """The cloud as `edgefleet demo` runs it: API, fleet service, the coordinator, and a
    dev-mode SuperLink."""
    settings = FederatedSettings(
        host="127.0.0.1", port=free_port(), internal_port=free_port(),
        wait_for_clients_s=90, round_timeout_s=90,
    )  # fmt: skip
    link = SuperLink(settings, data_dir=context.settings.data_dir, dev_mode=True)
    link.start()
    fleet = FleetService(context)
    fleet.start()
    coordinator = Coordinator(context, settings, on_rollout=fleet.rollouts.wake)
    app = create_app(context, fleet)
    app.state.federated = coordinator
    coordinator.start()
    try:
        with serve_in_thread(app) as url:
            cloud = Cloud(context, fleet, url)
            try:
                yield cloud, coordinator
            finally:
                for agent in cloud.agents:
                    agent.stop()
                clear_retained(context.urls.mqtt_url, [a.device_id for a in cloud.agents])
    finally:
        coordinator.stop()
        fleet.stop()
        link.stop()


def _feedback(agent: Agent, x: np.ndarray, y: np.ndarray) -> None:
    assert agent.api is not None
    with httpx.Client(base_url=agent.api.url, timeout=30) as client:
        for start in range(0, len(y), 50):
            rows = x[start : start + 50]
            body = {
                "model": MODEL,
                "labels": y[start : start + 50].tolist(),
                "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.reshape(-1).tolist()}],
            }  # fmt: skip
            r = client.post("/v1/feedback", json=body)
            assert r.status_code == 200, r.text


def _run(cloud: Cloud, run_id: int) -> dict[str, Any]:
    with cloud.admin() as c:
        body: dict[str, Any] = c.get(f"/v1/federated/runs/{run_id}").json()
    return body


def test_drifted_devices_to_a_new_version_active_on_the_canary(
    context: CloudContext, reference_onnx: dict[str, bytes], agent_dir: Path
) -> None:
    seed_reference_cache(context.settings, reference_onnx)
    registered = dict(register_reference(context, names=[MODEL], actor="test"))
    int8 = 2
    assert registered == {"digits-cloud": 1, MODEL: int8}
    with _federated_cloud(context) as (cloud, coordinator):
        address = coordinator.settings.fleet_address
        agents = [
            cloud.start_agent(
                cloud.agent_settings(
                    agent_dir,
                    federated=True,
                    federated_superlink=address,
                    federated_insecure=True,
                ),
                serve_api=True,
            )
            for _ in range(2)
        ]
        with context.database.session() as s:
            for agent in agents:
                device = s.get(Device, agent.device_id)
                assert device is not None
                device.labels = {"site": "lab"}
        with cloud.admin() as c:
            for agent in agents:
                r = c.put(f"/v1/devices/{agent.device_id}/deployments/{MODEL}",
                          json={"version": int8})  # fmt: skip
                assert r.status_code in (200, 202), r.text
        for agent in agents:
            cloud.wait_state(agent.device_id, "ACTIVE", int8, timeout=60)
        for agent, (x, y) in zip(agents, drifted_shards(2, per_device=PER_DEVICE), strict=True):
            _feedback(agent, x, y)
            assert agent.learning is not None
            state = wait_until(
                lambda a=agent: (s := a.learning.state()).supernode == "connected" and s,
                90, "the agent's SuperNode to connect",
            )  # fmt: skip
            assert state.samples == PER_DEVICE
            assert state.by_source == {"feedback": PER_DEVICE}

        with cloud.admin() as c:
            started = c.post(
                "/v1/federated/runs",
                json={"model": MODEL, "selector": {"site": "lab"}, "rounds": 2,
                      "min_clients": 2, "strategy": "fedprox", "proximal_mu": 0.1,
                      "rollout": {"canary": 1, "device_timeout_s": 120},
                      # 150 samples a device pull the head harder than the bench's fleet:
                      # the gate allows 5 points on the clean digits for the gain on
                      # rotated ones.
                      "gate": {"eval_dataset": "builtin:digits-rotated-20",
                               "max_drop_pt": 5, "min_gain_pt": 5}},
            )  # fmt: skip
        assert started.status_code == 201, started.text
        run_id = started.json()["id"]
        done = wait_until(
            lambda: (r := _run(cloud, run_id))["state"] not in ("PENDING", "RUNNING",
                                                              "FINALIZING") and r,
            420, "the federated run to end",
        )  # fmt: skip
        assert done["state"] == "COMPLETED", done["reason"]
        assert [(r["clients"], r["examples"]) for r in done["round_metrics"]] == [
            (2, 2 * PER_DEVICE)
        ] * 2
        assert done["metrics"]["gate"]["eval_gain_pt"] > 0
        fp32, new_int8 = done["result_version"], done["result_int8_version"]
        with context.database.session() as s:
            fp32_row = repository.get_version(s, model_name=MODEL, version=fp32)
            int8_row = repository.get_version(s, model_name=MODEL, version=new_int8)
            base_row = repository.get_version(s, model_name=MODEL, version=1)
            assert fp32_row.parent_id == base_row.id
            assert fp32_row.source == f"federated:run-{run_id}"
            assert int8_row.parent_id == fp32_row.id

        with cloud.admin() as c:
            rollout = c.get(f"/v1/rollouts/{done['rollout_id']}").json()
        assert rollout["version"] == new_int8
        canary = wait_until(
            lambda: next(
                (a for a in agents
                 if (m := a.runtime.models().get(MODEL)) and m.version == new_int8),
                None,
            ),
            120, "the canary to serve the new version",
        )  # fmt: skip
        cloud.wait_state(canary.device_id, "ACTIVE", new_int8, timeout=60)


def test_the_demo_runs_a_federated_round_and_shows_the_new_version_going_out(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """`edgefleet demo --federated`: its SuperLink and two agents with SuperNodes, tilted
    digits labelled on each, one round, the new version registered and ACTIVE on the canary;
    then a clean stop with no process left behind."""
    from tests.integration.test_demo import start_demo, stop_demo

    demo = start_demo(
        # No traffic: its hard rows, labelled by the cloud, would join the 300 feedback rows.
        tmp_path, reference_onnx, "--federated", "--agents", "2", "--duration", "1",
        "--traffic", "0",
        env={"EDGEFLEET_FEDERATED_PORT": str(free_port()),
             "EDGEFLEET_FEDERATED_INTERNAL_PORT": str(free_port())},
    )  # fmt: skip
    try:
        demo.wait_for("SuperLink  127.0.0.1:", timeout=180)
        demo.wait_for("150 samples kept on the device", timeout=180)
        tree = demo.tree()  # the agents and their SuperNodes are up by now
        assert sum("flower-supernode" in " ".join(p.cmdline()) for p in tree) == 2
        demo.wait_for("round 1: 2 devices, 300 examples", timeout=300)
        demo.wait_for("(INT8) registered", timeout=120)
        demo.wait_for("canary demo-agent-", timeout=180)
        demo.rest(timeout=120)
        assert demo.proc.returncode == 0, demo.text
        assert "runs digits-edge:4" in demo.text
        demo.assert_no_traceback()
        _gone, alive = psutil.wait_procs(tree, timeout=15)
        assert alive == [], demo.text
    finally:
        stop_demo(demo)
