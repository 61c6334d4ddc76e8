"""The ServerApp's rounds over an in-process Grid and the real ClientApp: the aggregate is
the example-weighted mean of the updates, only the run's devices take part, a silent device
is dropped without stalling the run, too few devices end it clearly, and the strategies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from cloud.federated.plan import DpConfig, RunFiles, RunPlan, TrainSettings
from cloud.federated.rounds import run_rounds
from edge_agent.federated.head import TrainConfig
from edge_agent.federated.local import RoundPlan, local_update
from tests.federated_support import (
    LocalGrid,
    add_samples,
    device_dir,
    drifted_shards,
    edge_model,
)

SIZES = (40, 60, 100)


def _base_head() -> dict[str, np.ndarray]:
    graph = onnx.load_from_string(edge_model()).graph
    return {
        i.name: numpy_helper.to_array(i)
        for i in graph.initializer
        if i.name in ("head.weight", "head.bias")
    }


def _plan(**overrides: object) -> RunPlan:
    values: dict[str, object] = {
        "run_id": 1, "model": "digits-edge", "base_version": 1, "versions": [1],
        "devices": ["dev-0", "dev-1", "dev-2"], "rounds": 2, "min_clients": 2,
        "min_samples": 20, "wait_for_clients_s": 0.5, "round_timeout_s": 5.0,
        "train": TrainSettings(epochs=2, seed=3), "weight_name": "head.weight",
        "bias_name": "head.bias", "embedding_output": "embedding",
    }  # fmt: skip
    return RunPlan.model_validate(values | overrides)


@pytest.fixture
def fleet(tmp_path: Path) -> dict[int, tuple[Path, str]]:
    shards = drifted_shards(3)
    nodes = {}
    for i, size in enumerate(SIZES):
        data_dir = device_dir(tmp_path / "devices", edge_model(), device_id=f"dev-{i}")
        x, y = shards[i]
        add_samples(data_dir, x[:size], y[:size])
        nodes[1000 + i] = (data_dir, f"dev-{i}")
    return nodes


def _files(tmp_path: Path) -> RunFiles:
    files = RunFiles(tmp_path / "run")
    files.root.mkdir(parents=True)
    files.write_head("base", _base_head())
    return files


def _expected_round(
    nodes: dict[int, tuple[Path, str]], head: dict[str, np.ndarray], server_round: int
) -> dict[str, np.ndarray]:
    """What each device computes from ``head``, averaged with weights = its examples."""
    plan = RoundPlan(
        model="digits-edge", weight_name="head.weight", bias_name="head.bias",
        embedding_output="embedding", versions=frozenset({1}), layout="in_out",
        min_samples=20, train=TrainConfig(epochs=2, seed=3),
    )  # fmt: skip
    updates = [
        local_update(d, device, plan, head["head.weight"], head["head.bias"], server_round)[0]
        for d, device in nodes.values()
    ]
    total = sum(u.examples for u in updates)
    return {
        "head.weight": sum(u.weight.astype(np.float64) * u.examples for u in updates) / total,
        "head.bias": sum(u.bias.astype(np.float64) * u.examples for u in updates) / total,
    }


def test_each_round_is_the_example_weighted_mean_of_the_updates(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    files = _files(tmp_path)
    outcome = run_rounds(LocalGrid(fleet), _plan(), files, sleep=lambda _s: None)
    assert outcome.state == "COMPLETED"
    assert outcome.rounds == 2
    head = _base_head()
    for server_round in (1, 2):
        expected = _expected_round(fleet, head, server_round)
        got = files.read_head(f"round-{server_round}")
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6)
        head = got
    np.testing.assert_array_equal(files.read_head("result")["head.weight"], head["head.weight"])
    reports = files.read_rounds()
    assert [r.examples for r in reports] == [200, 200]
    assert [r.clients for r in reports] == [3, 3]
    # Three heads of 330 floats each way, as Flower serializes them (.npy: 128-byte headers).
    assert all(r.bytes_down == r.bytes_up == 3 * (330 * 4 + 2 * 128) for r in reports)
    assert all(r.train_loss is not None for r in reports)
    assert reports[0].detail["updates"][0]["device"].startswith("dev-")


def test_only_the_runs_devices_are_sent_the_head(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    grid = LocalGrid(fleet)
    outcome = run_rounds(grid, _plan(devices=["dev-0", "dev-2"], rounds=1), _files(tmp_path))
    assert outcome.state == "COMPLETED"
    trained = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {1000, 1002}


def test_a_silent_device_is_dropped_and_the_run_goes_on(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    """dev-1 never answers: round 1 aggregates the other two after the round timeout, and
    round 2 does not ask dev-1 again."""
    grid = LocalGrid(fleet, silent=[1001])
    files = _files(tmp_path)
    outcome = run_rounds(grid, _plan(), files, sleep=lambda _s: None)
    assert outcome.state == "COMPLETED"
    first, second = files.read_rounds()
    assert (first.clients, first.dropped, first.detail["dropped"]) == (2, 1, ["dev-1"])
    assert (second.clients, second.dropped) == (2, 0)
    assert first.examples == SIZES[0] + SIZES[2]
    assert 5.0 in grid.timeouts  # the round waited its timeout, no longer


def test_too_few_devices_end_the_run_clearly(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    files = _files(tmp_path)
    outcome = run_rounds(LocalGrid(fleet), _plan(min_clients=4), files, sleep=lambda _s: None)
    assert outcome.state == "TOO_FEW_CLIENTS"
    assert "3 of the 4 devices needed" in (outcome.reason or "")
    assert files.read_outcome() == outcome
    assert not (files.root / "result.npz").exists()


def test_refusals_that_leave_too_few_updates_end_the_run_with_the_reasons(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    """min_samples 50: dev-0 (40 samples) refuses; with min_clients 3 the round cannot
    count, and the outcome says who refused and why."""
    files = _files(tmp_path)
    outcome = run_rounds(LocalGrid(fleet), _plan(min_samples=50, min_clients=3), files)
    assert outcome.state == "TOO_FEW_CLIENTS"
    assert "1 refused" in (outcome.reason or "")
    assert "dev-0: 40 usable samples" in (outcome.reason or "")
    assert files.read_rounds()[0].refused == 1
    assert files.read_rounds()[0].detail["aggregated"] is False


def test_fedprox_sends_its_mu_to_the_devices(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    grid = LocalGrid(fleet)
    plan = _plan(strategy="fedprox", proximal_mu=0.5, rounds=1)
    assert run_rounds(grid, plan, _files(tmp_path)).state == "COMPLETED"
    config = next(m for m in grid.sent if m.metadata.message_type == "train").content["config"]
    assert config["proximal-mu"] == 0.5


def test_server_side_dp_clips_each_update_and_adds_noise(
    tmp_path: Path, fleet: dict[int, tuple[Path, str]]
) -> None:
    """With no noise, each update's change is clipped to the norm, so the average moves at
    most that far; with noise, the result differs from the noiseless one."""
    base = _base_head()
    clipped = _files(tmp_path / "a")
    dp = DpConfig(noise_multiplier=0.0, clipping_norm=0.05)
    run_rounds(LocalGrid(fleet), _plan(rounds=1, dp=dp), clipped)
    moved = np.sqrt(sum(np.sum((clipped.read_head("result")[k] - base[k]) ** 2) for k in base))
    assert moved <= 0.05 + 1e-6
    noisy = _files(tmp_path / "b")
    run_rounds(
        LocalGrid(fleet),
        _plan(rounds=1, dp=DpConfig(noise_multiplier=1.0, clipping_norm=0.05)),
        noisy,
    )
    assert not np.allclose(
        noisy.read_head("result")["head.bias"], clipped.read_head("result")["head.bias"]
    )
