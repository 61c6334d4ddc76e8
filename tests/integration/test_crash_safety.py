"""An agent killed with SIGKILL at random points of download and activation, 50 times,
always restarts on a complete, verified model, and finishes the job."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cloud.pipeline.reference.graphs import mlp_classifier
from edge_agent.model_store import ModelStore, _sha256_file
from tests.fleet_harness import Cloud, wait_for

KILLS = 50


def _big_model(seed: int) -> bytes:
    """A ~2 MB digits-shaped MLP with random weights (what matters here is its size)."""
    rng = np.random.default_rng(seed)
    hidden = [
        (rng.normal(size=(64, 1024)).astype(np.float32) * 0.1, np.zeros(1024, np.float32)),
        (rng.normal(size=(1024, 384)).astype(np.float32) * 0.05, np.zeros(384, np.float32)),
    ]
    head = (rng.normal(size=(384, 10)).astype(np.float32) * 0.1, np.zeros(10, np.float32))
    return mlp_classifier(hidden=hidden, head=head, name=f"big{seed}")


def _check_store(data_dir: Path, expected: set[str]) -> str | None:
    """The store as the next start will see it: parsable, and every active blob verified."""
    state_file = data_dir / "store" / "state.json"
    if not state_file.exists():
        return None
    raw = json.loads(state_file.read_text())  # never torn: it is replaced atomically
    active = raw["active"].get("digits-edge")
    if active is None:
        return None
    sha = active["manifest"]["artifact"]["sha256"]
    assert sha in expected
    blob = data_dir / "store" / "blobs" / sha
    assert blob.is_file(), "state points at a missing blob"
    assert _sha256_file(blob) == sha, "state points at a blob that does not verify"
    store = ModelStore(data_dir / "store")  # what the agent itself loads on start
    assert store.active("digits-edge") is not None
    assert store.active("digits-edge").manifest.artifact.sha256 == sha  # type: ignore[union-attr]
    return sha


def test_sigkill_at_random_points_always_leaves_a_verified_model(
    embedded_cloud: Cloud, agent_dir: Path, tmp_path: Path
) -> None:
    cloud = embedded_cloud
    cloud.fleet.chunks.rate = 1.5 * 1024 * 1024  # ~1.5 s per artifact: kills land mid-download
    # Four versions in a cycle: the next target is never the active or the kept previous
    # one, so every switch needs a real download.
    versions = [cloud.register("digits-edge", _big_model(seed)) for seed in (1, 2, 3, 4)]
    with cloud.context.database.session() as s:
        from cloud.registry import repository

        shas = {
            repository.get_version(s, model_name="digits-edge", version=v).artifact_sha256: v
            for v in versions
        }
    settings = cloud.agent_settings(agent_dir, chunk_wait_s=0.5, telemetry_interval_s=5)
    config = tmp_path / "agent.json"
    config.write_text(settings.model_dump_json())
    log = (tmp_path / "agent.log").open("ab")
    rng = random.Random(7)
    target = 0
    kills, activations, mid_download, seen_states = 0, 0, 0, set()

    def deploy(index: int) -> None:
        with cloud.admin() as c:
            c.put(
                f"/v1/devices/{settings.device_id}/deployments/digits-edge",
                json={"version": versions[index]},
            )

    deploy(target)
    while kills < KILLS:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edge_agent.cli", "--config", str(config), "run", "--port", "0"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        time.sleep(rng.uniform(0.4, 2.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        if any((settings.data_dir / "store" / "partial").glob("*.part")):
            mid_download += 1
        active = _check_store(settings.data_dir, set(shas))
        if active is not None:
            seen_states.add(shas[active])
        if active == list(shas)[target]:
            activations += 1
            target = (target + 1) % len(versions)  # give the next life something to do
            deploy(target)
    log.close()
    # Now let it live: it resumes and finishes what it was told last.
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.cli", "--config", str(config), "run", "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: _check_store(settings.data_dir, set(shas)) == list(shas)[target],
            60,
            "final activation",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert kills == KILLS
    assert activations >= 2, "kills should straddle several activations"
    assert mid_download >= 10, f"only {mid_download} kills landed mid-download"
    assert len(seen_states) >= 3
