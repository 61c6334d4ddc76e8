"""`edgefleet demo`'s simulated fleet: a few simulated devices, the INT8 model rolled out to
them in waves through the rollout engine, each wave's progress printed; a second run starts
from fresh devices, and Ctrl-C leaves no simulator process behind."""

from __future__ import annotations

import re
from pathlib import Path

import psutil

from tests.integration.test_demo import READY_LINE, start_demo, stop_demo


def test_the_demo_rolls_the_int8_model_out_to_its_simulated_fleet_in_waves(
    tmp_path: Path, reference_onnx: dict[str, bytes]
) -> None:
    """Six simulated devices, canary 2 then waves growing twice: waves of 2 and 4, each
    printed as it goes, the rollout COMPLETED before the demo says it is ready. Run again on
    the same data dir, it deletes the six devices of the first run and does it all again."""
    for run in range(2):
        demo = start_demo(tmp_path, reference_onnx, "--agents", "0", "--sim-agents", "6")
        try:
            demo.wait_for(READY_LINE, timeout=240)
            text = demo.text
            assert re.search(r"rollout \d+, waves of 2, 4 ", text), text
            assert "wave 0 (2 devices): 2 ACTIVE" in text
            assert "wave 1 (4 devices): 4 ACTIVE" in text
            assert re.search(r"rollout \d+ COMPLETED", text), text
            assert ("Deleting the 6 simulated devices of an earlier run" in text) == (run == 1)
            workers = [
                p for p in demo.tree() if "simulate" in p.cmdline() and "--plan" in p.cmdline()
            ]
            assert len(workers) == 1
            demo.interrupt()
            assert demo.proc.returncode == 0, demo.text
            assert not psutil.pid_exists(workers[0].pid) or (
                workers[0].status() == psutil.STATUS_ZOMBIE
            )
            demo.assert_no_traceback()
        finally:
            stop_demo(demo)
