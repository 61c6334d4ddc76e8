"""`edgefleet model distill|prune|fp16|report` end to end, as a user runs them, against a
running API: results as tables, refusals as one red line and a non-zero exit."""

from __future__ import annotations

import os
import subprocess

from tests.cloud.pipeline.test_pipeline_api import EDGEFLEET
from tests.conftest import ADMIN_TOKEN, RunningApi, seed_reference_cache


def _cli(api: RunningApi, *args: str) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"COLUMNS": "250", "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN}
    return subprocess.run(
        [EDGEFLEET, "model", *args, "--api", api.url],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip


def test_the_compression_commands_end_to_end(
    api: RunningApi, reference_onnx: dict[str, bytes]
) -> None:
    seed_reference_cache(api.context.settings, reference_onnx)
    with api.client() as c:
        assert c.post("/v1/reference-models", json={"models": ["digits-edge"]}).is_success

    distilled = _cli(api, "distill", "mlp:32,16", "--teacher", "digits-cloud:1")
    assert distilled.returncode == 0, distilled.stdout + distilled.stderr
    assert "digits-cloud-student" in distilled.stdout
    assert "the same architecture on hard labels alone" in distilled.stdout

    pruned = _cli(api, "prune", "digits-edge", "1", "--sparsity", "0.5", "--fine-tune")
    assert pruned.returncode == 0, pruned.stdout + pruned.stderr
    assert "size_ratio=" in pruned.stdout
    with api.client() as c:
        assert c.get("/v1/models/digits-edge/versions/3").json()["source"] == "prune:structured"

    half = _cli(api, "fp16", "digits-cloud", "1")
    assert half.returncode == 0, half.stdout + half.stderr
    assert "fp16" in half.stdout

    report = _cli(api, "report", "digits-edge", "--cloud-model", "digits-cloud:1")
    assert report.returncode == 0, report.stdout + report.stderr
    lines = [line for line in report.stdout.splitlines() if "prune:structured" in line]
    assert len(lines) == 1
    assert "KiB" in lines[0]

    student = _cli(api, "report", "digits-cloud-student")
    assert "teacher digits-cloud:1" in student.stdout

    bad = _cli(api, "prune", "digits-edge", "1", "--sparsity", "1.0")
    assert bad.returncode == 1
    assert "error 400" in bad.stdout
    assert "sparsity" in bad.stdout
    assert "Traceback" not in bad.stdout + bad.stderr

    unknown = _cli(api, "distill", "mlp:8", "--teacher", "nope:1")
    assert unknown.returncode == 1
    assert "unknown model 'nope'" in unknown.stdout
