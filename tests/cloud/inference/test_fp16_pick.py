"""FP16 versions are served as "latest" only where CUDA (or TensorRT) runs the sessions: on
this CPU machine "latest" stays on the newest non-FP16 version, while a version asked for
by number is served as asked."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cloud.context import CloudContext
from cloud.inference.catalog import Catalog
from cloud.inference.engine import serves_fp16
from cloud.pipeline.compress.fp16 import to_fp16
from cloud.pipeline.register import register_version
from cloud.registry import repository
from shared.errors import NotFound
from shared.tensors import decode_response, encode_request
from tests.cloud.inference.conftest import FEATURES, MODEL, register, serving
from tests.onnx_models import tiny_classifier

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def _register_fp16(
    context: CloudContext, name: str, parent: bytes, parent_version: int | None = 1
) -> int:
    data = to_fp16(parent)
    with context.database.session() as s:
        return register_version(
            s, context.artifacts, model_name=name, blocks=[data], max_bytes=len(data),
            precision="fp16", actor="test", parent_version=parent_version, source="fp16",
        ).version  # fmt: skip


def test_the_provider_decides_whether_fp16_is_served() -> None:
    """``available``: the providers a session actually got (see the next-but-one test)."""
    assert serves_fp16([CUDA, CPU], [CUDA, CPU])
    assert serves_fp16(["TensorrtExecutionProvider", CUDA, CPU], ["TensorrtExecutionProvider", CPU])
    assert not serves_fp16([CUDA, CPU], [CPU])
    assert not serves_fp16([CPU, CUDA], [CUDA, CPU])


def test_latest_skips_fp16_unless_the_catalog_serves_it(context: CloudContext) -> None:
    parent = tiny_classifier(features=FEATURES, classes=3, seed=1)
    register(context, MODEL, parent)
    assert _register_fp16(context, MODEL, parent) == 2
    cpu = Catalog(context.database, ttl_s=60)
    gpu = Catalog(context.database, ttl_s=60, fp16=True)
    assert (cpu.resolve(MODEL, None).version, cpu.resolve(MODEL, None).precision) == (1, "fp32")
    assert gpu.resolve(MODEL, None).version == 2
    assert cpu.resolve(MODEL, 2).precision == "fp16"  # asked for by number: as asked
    assert cpu.cached(MODEL, None) is not None
    assert cpu.cached(MODEL, None).version == 1  # type: ignore[union-attr]

    # A model whose only versions are FP16, on a CPU-only service: refused with the reason.
    with context.database.session() as s:
        repository.create_model(s, name="only-half")
    assert _register_fp16(context, "only-half", parent, parent_version=None) == 1
    with pytest.raises(NotFound, match="only FP16 versions"):
        Catalog(context.database, ttl_s=60).resolve("only-half", None)


def test_the_cpu_service_answers_latest_from_the_fp32_version(context: CloudContext) -> None:
    """Over HTTP on this machine (CPU provider only): "latest" is version 1, the FP32 parent,
    though version 2 (its FP16 child) is newer; version 2 by number answers too, with FP32
    outputs, as its parent does."""
    parent = tiny_classifier(features=FEATURES, classes=3, seed=1)
    register(context, MODEL, parent)
    _register_fp16(context, MODEL, parent)
    rows = np.random.default_rng(0).normal(size=(2, FEATURES)).astype(np.float32)
    with serving(context) as running, running.client() as c:
        assert running.service.catalog.fp16 is False
        answers = {}
        for path in ("", "/versions/2"):
            body, headers = encode_request({"input": rows})
            r = c.post(f"/v2/models/{MODEL}{path}/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            length = int(r.headers.get("Inference-Header-Content-Length", len(r.content)))
            answers[path] = decode_response(r.content, length)
    assert answers[""].model_version == "1"
    assert answers["/versions/2"].model_version == "2"
    probs = answers["/versions/2"].outputs["probabilities"]
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, answers[""].outputs["probabilities"], atol=2e-3)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_a_listed_but_unusable_cuda_does_not_serve_fp16(
    context: CloudContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime lists CUDA among the available providers even when its libraries are
    missing; a session then falls back to the CPU. Here CUDA is listed but cannot run (this
    build has no CUDA): the service asks a session which provider it got, and does not
    serve FP16 versions as "latest"."""
    import onnxruntime as ort

    from cloud.inference.service import InferenceService

    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    wants_gpu = context.settings.model_copy(update={"inference_providers": [CUDA, CPU]})
    service = InferenceService(dataclasses.replace(context, settings=wants_gpu))
    try:
        assert service.catalog.fp16 is False
    finally:
        service.close()
