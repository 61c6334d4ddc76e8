"""Real Flower federations on loopback (slow: a round costs several seconds of Flower's own
polling): a SuperLink with TLS and SuperNode authentication and two SuperNodes supervised as
the agent supervises them, for two rounds whose aggregates must be the example-weighted means
of what the devices computed; an unregistered SuperNode kept out; and a SuperNode killed
mid-round that does not stall the run."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cloud.federated.plan import RunFiles, RunPlan, TrainSettings
from edge_agent.federated.head import TrainConfig
from edge_agent.federated.local import RoundPlan, local_update
from edge_agent.federated.node_key import ensure_node_key
from edge_agent.federated.supervisor import SupernodeState, SupernodeSupervisor
from tests.federated_support import (
    add_samples,
    device_dir,
    drifted_shards,
    edge_model,
    federation,
    wait_until,
)
from tests.pki import make_pki

pytestmark = pytest.mark.federated

SIZES = (50, 90)


def _base() -> dict[str, np.ndarray]:
    graph = onnx.load_from_string(edge_model()).graph
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if i.name in ("head.weight", "head.bias")
    }


def _devices(root: Path) -> list[tuple[Path, str]]:
    shards = drifted_shards(2)
    devices = []
    for i, size in enumerate(SIZES):
        data_dir = device_dir(root / "devices", edge_model(), device_id=f"dev-{i}")
        x, y = shards[i]
        add_samples(data_dir, x[:size], y[:size])
        devices.append((data_dir, f"dev-{i}"))
    return devices


def _plan(**overrides: object) -> RunPlan:
    values: dict[str, object] = {
        "run_id": 1, "model": "digits-edge", "base_version": 1, "versions": [1],
        "devices": ["dev-0", "dev-1"], "rounds": 2, "min_clients": 2, "min_samples": 20,
        "wait_for_clients_s": 60, "round_timeout_s": 60,
        "train": TrainSettings(epochs=2, seed=5), "weight_name": "head.weight",
        "bias_name": "head.bias", "embedding_output": "embedding",
    }  # fmt: skip
    return RunPlan.model_validate(values | overrides)


def _outcome(files: RunFiles, timeout: float) -> str:
    outcome = wait_until(files.read_outcome, timeout, "the ServerApp's outcome")
    return str(outcome.state)


def _connected(supervisor: SupernodeSupervisor) -> bool:
    return supervisor.status().state is SupernodeState.CONNECTED


def test_two_tls_authenticated_supernodes_two_rounds_weighted_mean(tmp_path: Path) -> None:
    """SuperLink with TLS and SuperNode authentication; two devices whose keys are registered
    connect, a third whose key is not is refused (its supervisor backs off and says why).
    After each of two rounds the global head is the example-weighted mean of the heads the
    two devices computed from the previous one (recomputed here from their buffers)."""
    pki = make_pki(tmp_path / "pki")
    devices = _devices(tmp_path)
    with federation(tmp_path, pki=pki, auth=True) as fed:
        supervisors = []
        for data_dir, device_id in devices:
            key = data_dir / "flower" / "node_key"
            fed.cli.register_node(ensure_node_key(key), device_id)
            supervisors.append(fed.supernode(data_dir, device_id, key=key))
        stranger_dir = device_dir(tmp_path / "devices", edge_model(), device_id="dev-x")
        stranger_key = stranger_dir / "flower" / "node_key"
        ensure_node_key(stranger_key)
        stranger = fed.supernode(stranger_dir, "dev-x", key=stranger_key)
        try:
            for supervisor in supervisors:
                wait_until(lambda s=supervisor: _connected(s), 90, "a registered SuperNode")
            refused = wait_until(
                lambda: stranger.status().restarts > 0 and stranger.status(), 90,
                "the unregistered SuperNode to be refused",
            )  # fmt: skip
            assert refused.state is not SupernodeState.CONNECTED
            assert "Failed to activate SuperNode" in (refused.reason or "")
            files = fed.submit(_plan(), _base())
            assert _outcome(files, 240) == "COMPLETED"
        finally:
            for supervisor in [*supervisors, stranger]:
                supervisor.stop()
    plan = RoundPlan(
        model="digits-edge", weight_name="head.weight", bias_name="head.bias",
        embedding_output="embedding", versions=frozenset({1}), layout="in_out",
        min_samples=20, train=TrainConfig(epochs=2, seed=5),
    )  # fmt: skip
    head = _base()
    for server_round in (1, 2):
        updates = [
            local_update(d, dev, plan, head["head.weight"], head["head.bias"], server_round)[0]
            for d, dev in devices
        ]
        assert [u.examples for u in updates] == list(SIZES)
        total = sum(SIZES)
        got = files.read_head(f"round-{server_round}")
        expected_w = sum(u.weight.astype(np.float64) * u.examples for u in updates) / total
        expected_b = sum(u.bias.astype(np.float64) * u.examples for u in updates) / total
        np.testing.assert_allclose(got["head.weight"], expected_w, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["head.bias"], expected_b, rtol=1e-5, atol=1e-6)
        head = got
    reports = files.read_rounds()
    assert [(r.clients, r.examples, r.dropped) for r in reports] == [(2, total, 0)] * 2


def test_a_supernode_killed_mid_round_does_not_stall_the_run(tmp_path: Path) -> None:
    """dev-1's SuperNode and everything in its process group are SIGKILLed as the round's
    train message reaches it (a device losing power mid-round). Round 1 aggregates dev-0
    alone once its timeout passes; the supervisor restarts dev-1's SuperNode, which comes
    back as a new node; the run completes without waiting on the dead one again."""
    devices = _devices(tmp_path)
    with federation(tmp_path) as fed:
        supervisors = [fed.supernode(d, dev) for d, dev in devices]
        try:
            for supervisor in supervisors:
                wait_until(lambda s=supervisor: _connected(s), 90, "a SuperNode")
            killed_node = supervisors[1].status().node_id
            files = fed.submit(_plan(min_clients=1, round_timeout_s=20), _base())
            log = devices[1][0] / "logs" / "supernode.log"
            wait_until(
                lambda: "Receiving: train message" in log.read_text(), 120,
                "dev-1 to receive the round", interval=0.02,
            )  # fmt: skip
            pid = supervisors[1].pid
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)
            assert _outcome(files, 240) == "COMPLETED"
            assert supervisors[1].status().restarts >= 1
        finally:
            for supervisor in supervisors:
                supervisor.stop()
    first, second = files.read_rounds()
    assert (first.clients, first.dropped, first.detail["dropped"]) == (1, 1, ["dev-1"])
    assert first.examples == SIZES[0]
    assert second.dropped == 0
    assert str(killed_node) not in {u["node"] for u in second.detail["updates"]}
