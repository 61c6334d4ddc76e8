"""Warm sessions: loaded on first use, evicted least recently used past the byte bound, a
slow load holding up no other model, batching read from the version's ONNX metadata, and
execution providers picked in the configured order."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx

from cloud.context import CloudContext
from cloud.inference.batcher import BatchConfig
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine, open_engine, select_providers
from cloud.inference.pool import MAX_BATCH_KEY, QUEUE_DELAY_KEY, batch_config
from shared.messages import TensorSpec
from shared.tensors import encode_request
from tests.cloud.inference.conftest import FEATURES, MODEL, RunningInference, register, serving
from tests.onnx_models import tiny_classifier

DEFAULTS = BatchConfig(max_batch_size=16, max_queue_delay_s=0.05, max_queue=8, queue_timeout_s=5)


def _infer(running: RunningInference, model: str, version: int) -> int:
    body, headers = encode_request({"input": np.zeros((1, FEATURES), dtype=np.float32)})
    with running.client() as c:
        return int(
            c.post(
                f"/v2/models/{model}/versions/{version}/infer", content=body, headers=headers
            ).status_code
        )


def test_past_the_memory_bound_the_least_recently_used_version_goes(
    registered: CloudContext,
) -> None:
    """Room for one model: serving version 2 after version 1 evicts 1, and 1 loads again
    when asked for."""
    one = len(tiny_classifier(features=FEATURES, classes=3, seed=1))
    with serving(registered, inference_memory_bytes=one + 10) as running:
        assert _infer(running, MODEL, 1) == 200
        assert running.service.pool.loaded() == [(MODEL, 1)]
        assert _infer(running, MODEL, 2) == 200
        assert running.service.pool.loaded() == [(MODEL, 2)]
        assert _infer(running, MODEL, 1) == 200
        assert running.service.pool.loaded() == [(MODEL, 1)]
        evicted = running.metric(
            "edgefleet_inference_model_evictions_total", model=MODEL, version="1"
        )
    assert evicted == 1


def test_a_slow_load_holds_up_no_other_model(registered: CloudContext) -> None:
    """While one model's session is still loading, another model answers."""
    register(registered, "slow", tiny_classifier(features=FEATURES, classes=3, seed=9))
    loading, release = threading.Event(), threading.Event()

    def engine(info: VersionInfo) -> Engine:
        if info.model == "slow":
            loading.set()
            release.wait(30)
        return open_engine(registered.artifacts.path(info.sha256), providers=["CPU"])

    with serving(registered, engine=engine) as running, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_infer, running, "slow", 1)
        assert loading.wait(30)
        assert _infer(running, MODEL, 2) == 200
        assert not slow.done()
        release.set()
        assert slow.result() == 200


def test_batching_comes_from_the_version_s_metadata(tmp_path: Path) -> None:
    """edgefleet.max_batch_size and edgefleet.max_queue_delay_ms in the ONNX metadata win
    over the defaults; a model with a fixed first dimension is not batched."""
    model = onnx.load_from_string(tiny_classifier(features=FEATURES, classes=3))
    onnx.helper.set_model_props(model, {MAX_BATCH_KEY: "4", QUEUE_DELAY_KEY: "7.5"})
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    engine = open_engine(path, providers=["CPUExecutionProvider"])
    dynamic = TensorSpec(name="input", datatype="FP32", shape=[-1, FEATURES])
    info = VersionInfo("m", 1, "0" * 64, 1, "fp32", (dynamic,), (), (1,))
    config = batch_config(info, engine, DEFAULTS)
    assert (config.max_batch_size, config.max_queue_delay_s) == (4, 0.0075)
    fixed = TensorSpec(name="input", datatype="FP32", shape=[1, FEATURES])
    assert batch_config(replace(info, inputs=(fixed,)), engine, DEFAULTS).max_batch_size == 0


def test_providers_follow_the_configured_order_among_those_available() -> None:
    """TensorRT → CUDA → CPU where all exist; only CPU here; CPU is always the last resort."""
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    everything = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert select_providers(wanted, everything) == wanted
    assert select_providers(wanted, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert select_providers(["CUDAExecutionProvider"], ["CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]


def test_intra_op_threads_sleep_rather_than_spin_between_batches(tmp_path: Path) -> None:
    """The event loop and the batcher share the cores with onnxruntime's intra-op threads:
    threads that spin while waiting for work would take those cores from them."""
    path = tmp_path / "m.onnx"
    path.write_bytes(tiny_classifier(features=FEATURES, classes=3))
    engine = open_engine(path, providers=["CPUExecutionProvider"], threads=2)
    options = engine.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2
    spinning = open_engine(path, providers=["CPUExecutionProvider"], threads=2, spin=True)
    entry = spinning.session.get_session_options().get_session_config_entry
    assert entry("session.intra_op.allow_spinning") == "1"
