"""A model published in the registry reaches an agent over MQTT, is verified, health-checked,
activated and answers; the cloud sees ACTIVE with the right version."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from cloud.pipeline.reference.digits import digits_splits
from cloud.registry import repository
from shared.tensors import HEADER_LENGTH, decode_response, encode_request
from tests.fleet_harness import Cloud, wait_for


def test_a_registered_model_reaches_the_agent_and_answers(
    cloud: Cloud, reference_onnx: dict[str, bytes], agent_dir: Path
) -> None:
    version = cloud.register("digits-edge", reference_onnx["digits-edge"])
    agent = cloud.start_agent(cloud.agent_settings(agent_dir), serve_api=True)
    live_key = f"edgefleet:device:{agent.device_id}"
    wait_for(lambda: cloud.context.redis.hget(live_key, "presence") == b"online", 15, "online")
    with cloud.admin() as c:
        r = c.put(
            f"/v1/devices/{agent.device_id}/deployments/digits-edge", json={"version": version}
        )
    assert r.status_code == 202, r.text
    active = cloud.wait_state(agent.device_id, "ACTIVE", version)
    assert active["model"] == "digits-edge"
    states = [e["state"] for e in reversed(cloud.events(agent.device_id))]
    assert states[:1] == ["QUEUED"]
    for step in ("DOWNLOADING", "VERIFYING", "STAGED", "HEALTHCHECK", "ACTIVE"):
        assert step in states
    assert states.index("HEALTHCHECK") < states.index("ACTIVE")

    # The cloud's registry sees the device's reported state.
    def reported() -> bool:
        with cloud.context.database.session() as s:
            device = repository.get_device(s, device_id=agent.device_id)
            return bool(device.reported.get("active") == {"digits-edge": version})

    wait_for(reported, 15, "reported state in the registry")
    # In-process answer.
    splits = digits_splits(0)
    answer = agent.infer("digits-edge", {"input": splits.x_test[:4]})
    assert answer.source == "edge"
    assert answer.version == version
    assert answer.latency_ms > 0
    assert (answer.outputs["probabilities"].argmax(axis=1) == splits.y_test[:4]).mean() >= 0.75
    # Local HTTP API, binary tensors, as tritonclient would send them.
    assert agent.api is not None
    body, headers = encode_request(
        {"input": splits.x_test[:2]}, binary=True, outputs=["probabilities"]
    )
    response = httpx.post(
        f"{agent.api.url}/v2/models/digits-edge/infer", content=body, headers=headers
    )
    assert response.status_code == 200, response.text
    parsed = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
    assert parsed.model_version == str(version)
    assert parsed.parameters["source"] == "edge"
    assert parsed.outputs["probabilities"].shape == (2, 10)
    bad = httpx.post(
        f"{agent.api.url}/v2/models/digits-edge/infer",
        json={
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        },
    )
    assert bad.status_code == 400
    assert "shape" in bad.json()["error"]
    nans = ",".join(["NaN"] * 64)
    nan_body = '{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ['
    nan_body += nans + "]}]}"
    nan = httpx.post(f"{agent.api.url}/v2/models/digits-edge/infer", content=nan_body)
    assert nan.status_code == 400
    assert httpx.get(f"{agent.api.url}/v2/models/nope").status_code == 404
    assert httpx.get(f"{agent.api.url}/v2/health/ready").status_code == 200
    metrics = httpx.get(f"{agent.api.url}/metrics").text
    assert f'edgefleet_agent_active_version{{model="digits-edge"}} {version}' in metrics
    # Telemetry reaches the cloud's live view.
    wait_for(
        lambda: cloud.context.redis.get(f"edgefleet:telemetry:{agent.device_id}"), 10, "telemetry"
    )
    with cloud.admin() as c:
        live = c.get(f"/v1/devices/{agent.device_id}/live").json()
    assert live["presence"] == "online"
    assert live["telemetry"]["active"] == {"digits-edge": version}
    _ = np
