"""B6 — federated update: K devices (2, 5, 10) on drifted local data, a real SuperLink and K
real SuperNodes on loopback, R rounds of the head.

    python -m bench b6_federated [--quick]

Per round: wall time, bytes down and up (the heads Flower carried, as serialized) and
Flower's own traffic count for the run. After R rounds: accuracy on the drifted distribution
(what the devices see: half the digits tilted 20 degrees) and on fully tilted and clean
digits (the 720 calibration and test digits, which no device holds), before and after,
against centralized fine-tuning of the same head on the union of the devices' data, trained
to convergence (50 epochs: the upper bound); recovery = (federated - before) /
(centralized - before). Each K is repeated with other data (which device holds which digit,
which are tilted): medians. Then, once, the whole loop through the cloud (`run_cloud`, as
`edgefleet demo` runs it) with real `edge-agent` processes: time from POST
/v1/federated/runs to the new INT8 version ACTIVE on the canary device.

The devices serve the FP32 reference digits-edge here (their embedding is what the head
reads); the INT8 path is the last part's, and the pipeline's gate's.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write
from bench.federated_fleet import (
    Devices,
    base_head,
    canary_timing,
    embeddings,
    submit,
)
from cloud.embedded.processes import free_port
from cloud.federated.coordinator import flower_cli
from cloud.federated.drift import device_shards, drifted, mixed_drift
from cloud.federated.plan import RunFiles, TrainSettings
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from cloud.pipeline.reference.digits import build_edge, digits_splits
from edge_agent.federated.head import TrainConfig, evaluate_head, train_head

ROUNDS = 3
EPOCHS = TrainSettings().epochs  # the runs' default local epochs
CENTRAL_EPOCHS = 50
DEGREES = 20.0
SEEDS = (5, 6, 7)


def _accuracy(head: dict[str, np.ndarray], vectors: np.ndarray, labels: np.ndarray) -> float:
    return evaluate_head(head["head.weight"], head["head.bias"], vectors, labels)[1]


def _eval_sets(model: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    splits = digits_splits(0)
    x = np.concatenate([splits.x_calib, splits.x_test])
    labels = np.concatenate([splits.y_calib, splits.y_test])
    sets = {
        "drifted": mixed_drift(x, "rotated", DEGREES, 0.5, seed=7),
        "tilted": drifted(x, "rotated", DEGREES),
        "clean": x,
    }
    return {name: (embeddings(model, data), labels) for name, data in sets.items()}


def _central(model: bytes, shards: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    """The same head trained on the union of the devices' data, to convergence."""
    head = base_head(model)
    x = np.concatenate([s[0] for s in shards])
    y = np.concatenate([s[1] for s in shards])
    update = train_head(
        head["head.weight"], head["head.bias"], embeddings(model, x), y,
        TrainConfig(epochs=CENTRAL_EPOCHS, seed=1),
    )  # fmt: skip
    return {"head.weight": update.weight, "head.bias": update.bias}


def _federate(model: bytes, clients: int, rounds: int, root: Path, seed: int) -> dict[str, Any]:
    shards = device_shards(clients, degrees=DEGREES, seed=seed)
    settings = FederatedSettings(
        host="127.0.0.1", port=free_port(), internal_port=free_port(),
        wait_for_clients_s=300, round_timeout_s=300,
    )  # fmt: skip
    link = SuperLink(settings, data_dir=root / "cloud", dev_mode=True)
    link.start()
    devices = Devices(root / "devices", model, shards, settings.fleet_address)
    try:
        connect_s = devices.start(timeout=300)
        cli = flower_cli(root / "cloud", settings)
        started = time.monotonic()
        files, flower_id = submit(cli, root / "cloud", devices.ids, rounds, model, EPOCHS)
        outcome = devices.wait_outcome(files, timeout=rounds * 600)
        run_s = time.monotonic() - started
        traffic = cli.status(flower_id)
    finally:
        devices.stop()
        link.stop()
    if outcome.state != "COMPLETED":
        raise RuntimeError(f"K={clients}: the run ended {outcome.state}: {outcome.reason}")
    report = _report(model, clients, rounds, shards, files, run_s, connect_s, traffic)
    return {"seed": seed, **report}


def _median_of(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for K: medians over the repeats, and each repeat's recovery."""
    first = repeats[0]
    accuracy = {
        name: {
            key: round(statistics.median(r["accuracy"][name][key] for r in repeats), 4)
            for key in ("before", "federated", "centralized")
        }
        for name in first["accuracy"]
    }
    recovery = {
        name: round(statistics.median(r["recovery"][name] for r in repeats), 3)
        for name in first["recovery"]
    }
    return {
        "clients": first["clients"],
        "repeats": len(repeats),
        "round_wall_s_median": round(
            statistics.median(w for r in repeats for w in r["round_wall_s"]), 2
        ),
        "identify_s_median": round(statistics.median(r["identify_s"] for r in repeats), 2),
        "bytes_down_per_round": first["bytes_down_per_round"],
        "bytes_up_per_round": first["bytes_up_per_round"],
        "flower_traffic_median": {
            k: int(statistics.median(r["flower_traffic"][k] for r in repeats))
            for k in ("inbound", "outbound")
        },
        "accuracy": accuracy,
        "recovery": recovery,
        "recovery_each": {
            name: [r["recovery"][name] for r in repeats] for name in first["recovery"]
        },
    }


def _report(
    model: bytes,
    clients: int,
    rounds: int,
    shards: list[tuple[np.ndarray, np.ndarray]],
    files: RunFiles,
    run_s: float,
    connect_s: float,
    traffic: Any,
) -> dict[str, Any]:
    evals = _eval_sets(model)
    before, central = base_head(model), _central(model, shards)
    after = files.read_head("result")
    accuracy = {
        name: {
            "before": round(_accuracy(before, v, y), 4),
            "federated": round(_accuracy(after, v, y), 4),
            "centralized": round(_accuracy(central, v, y), 4),
            "by_round": [
                round(_accuracy(files.read_head(f"round-{r}"), v, y), 4)
                for r in range(1, rounds + 1)
            ],
        }
        for name, (v, y) in evals.items()
    }
    recovery = {
        name: round((a["federated"] - a["before"]) / (a["centralized"] - a["before"]), 3)
        for name, a in accuracy.items()
        if name != "clean" and a["centralized"] != a["before"]
    }
    reports = files.read_rounds()
    return {
        "clients": clients,
        "rounds": rounds,
        "examples": sum(len(s[1]) for s in shards),
        "connect_s": round(connect_s, 2),
        "run_s": round(run_s, 2),
        "round_wall_s": [r.wall_s for r in reports],
        "round_wall_s_median": round(statistics.median(r.wall_s for r in reports), 2),
        "identify_s": reports[0].detail.get("waited_s"),
        "bytes_down_per_round": reports[0].bytes_down,
        "bytes_up_per_round": reports[0].bytes_up,
        "flower_traffic": {"inbound": traffic.inbound_bytes, "outbound": traffic.outbound_bytes},
        "accuracy": accuracy,
        "recovery": recovery,
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    fleet = (2,) if quick else (2, 5, 10)
    rounds = 2 if quick else ROUNDS
    seeds = SEEDS[:1] if quick else SEEDS
    model = build_edge(digits_splits(0))
    results: dict[str, Any] = {
        "rounds": rounds, "local_epochs": EPOCHS, "central_epochs": CENTRAL_EPOCHS,
        "drift_degrees": DEGREES, "seeds": list(seeds),
    }  # fmt: skip
    load_before = os.getloadavg()
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-b6-") as tmp:
        for clients in fleet:
            repeats = []
            for seed in seeds:
                print(f"  K={clients}, data seed {seed}: {rounds} rounds")
                run = _federate(model, clients, rounds, Path(tmp) / f"k{clients}-{seed}", seed)
                repeats.append(run)
                drift = run["accuracy"]["drifted"]
                print(
                    f"    round {run['round_wall_s_median']:.1f}s (median), "
                    f"{run['bytes_down_per_round']} B down / {run['bytes_up_per_round']} B up; "
                    f"drifted accuracy {drift['before']:.3f} -> {drift['federated']:.3f} "
                    f"(centralized {drift['centralized']:.3f}), recovery {run['recovery']}"
                )
            runs.append({**_median_of(repeats), "each": repeats})
        results["runs"] = runs
        print(f"  start-to-canary: {2} agents, {rounds} rounds, through the cloud")
        results["canary"] = canary_timing(Path(tmp) / "canary", agents=2, rounds=rounds)
        print(f"    {results['canary']}")
    results["loadavg_before"] = [round(x, 2) for x in load_before]
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"  wrote {write('b6_federated' + ('_quick' if quick else ''), results)}")
