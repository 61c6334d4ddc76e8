"""A model version that fails every device's health check: the same graph, new bytes (so a
device downloads and checks it rather than relabelling what it runs), and golden outputs that
cannot match. What a canary exists to stop."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import onnx

from cloud.pipeline.golden import golden_examples
from cloud.simulate.fleet import answer
from shared.errors import EdgeFleetError, InvalidInput
from shared.messages import HealthCheckSpec

__all__ = ["broken_copy", "register_broken"]


def broken_copy(model: bytes) -> tuple[bytes, HealthCheckSpec]:
    """``model`` with a marker in its metadata, and golden examples whose outputs are the
    model's own for an all-zero row, each value off by one (far beyond any tolerance)."""
    graph = onnx.load_from_string(model)
    onnx.helper.set_model_props(
        graph, {**{p.key: p.value for p in graph.metadata_props}, "edgefleet.broken": "golden"}
    )
    data = graph.SerializeToString()
    initializers = {i.name for i in graph.graph.initializer}
    inputs = {}
    for value in graph.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        if dtype.kind not in "biuf":
            raise InvalidInput(f"input {value.name!r}: only numeric inputs can be made broken")
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in tensor.shape.dim]
        inputs[value.name] = np.zeros([1, *dims[1:]], dtype=dtype)
    spec = golden_examples(data, inputs, count=1)
    wrong = [
        g.model_copy(update={"outputs": {k: [x + 1.0 for x in v] for k, v in g.outputs.items()}})
        for g in spec.golden
    ]
    return data, spec.model_copy(update={"golden": wrong})


def register_broken(client: httpx.Client, model: str) -> dict[str, Any]:
    """Register a broken copy of ``model``'s newest version over the REST API (``client``
    carries the admin token); returns the new version as the API describes it."""
    versions = answer(client.get(f"/v1/models/{model}/versions"))
    if not versions:
        raise InvalidInput(f"model {model!r} has no version to copy")
    newest = max(versions, key=lambda v: int(v["version"]))
    response = client.get(f"/v1/artifacts/{newest['sha256']}")
    if response.status_code != 200:
        raise EdgeFleetError(f"artifact of {model}:{newest['version']}: {response.status_code}")
    data, spec = broken_copy(response.content)
    metadata = {"precision": newest["precision"], "healthcheck": spec.model_dump(mode="json")}
    row: dict[str, Any] = answer(
        client.post(
            f"/v1/models/{model}/versions",
            files={"file": ("broken.onnx", data, "application/octet-stream")},
            data={"metadata": json.dumps(metadata)},
        )
    )
    return row
