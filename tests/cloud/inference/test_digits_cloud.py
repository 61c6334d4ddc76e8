"""The cloud model the platform ships (digits-cloud), served as the agent calls it: the edge
agent's own CloudClient gets the model's answers on held-out digits."""

from __future__ import annotations

import numpy as np

from cloud.context import CloudContext
from cloud.pipeline.reference.digits import digits_splits
from edge_agent.cloud_client import CloudClient
from tests.cloud.inference.conftest import register, serving


def test_the_agent_s_cloud_client_gets_digits_cloud_answers(
    context: CloudContext, reference_onnx: dict[str, bytes]
) -> None:
    """KServe v2 binary from the agent's client, a batch of 64 test digits: the answers are
    the cloud model's (above 97 % right) and come back in order."""
    register(context, "digits-cloud", reference_onnx["digits-cloud"])
    splits = digits_splits(0)
    x, y = splits.x_test[:64].astype(np.float32), splits.y_test[:64]
    with serving(context) as running:
        client = CloudClient(running.url, running.device_token, budget_s=30)
        try:
            answer = client.infer("digits-cloud", {"input": x})
        finally:
            client.close()
    assert answer.model == "digits-cloud"
    assert answer.version == 1
    probabilities = answer.outputs["probabilities"]
    assert probabilities.shape == (64, 10)
    assert float((probabilities.argmax(axis=1) == y).mean()) > 0.97
