"""Faults: each test checks that the agent keeps serving a valid model and reports why."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from cloud.embedded.processes import free_port
from cloud.fleet.desired import manifest_for
from cloud.pipeline.reference.digits import digits_splits
from cloud.registry import repository
from edge_agent.agent import Agent
from shared import topics
from shared.messages import Deployment, DesiredState, GoldenExample, HealthCheckSpec, RoutingSpec
from shared.signing import generate_key, sign
from shared.topics import DeviceTopic
from tests.fleet_harness import Cloud, wait_for
from tests.onnx_models import tiny_classifier

X = digits_splits(0).x_test


def _deploy(cloud: Cloud, agent: Agent, version: int, model: str = "digits-edge") -> None:
    with cloud.admin() as c:
        r = c.put(f"/v1/devices/{agent.device_id}/deployments/{model}", json={"version": version})
    assert r.status_code == 202, r.text


def _serving(agent: Agent, version: int) -> None:
    answer = agent.infer("digits-edge", {"input": X[:3]})
    assert answer.version == version
    assert answer.outputs["probabilities"].shape == (3, 10)


@pytest.fixture
def v1_agent(embedded_cloud: Cloud, reference_onnx: dict[str, bytes], agent_dir: Path) -> Agent:
    """An agent already running digits-edge v1."""
    version = embedded_cloud.register("digits-edge", reference_onnx["digits-edge"])
    agent = embedded_cloud.start_agent(
        embedded_cloud.agent_settings(agent_dir, download_max_stalls=3, chunk_wait_s=0.5)
    )
    _deploy(embedded_cloud, agent, version)
    embedded_cloud.wait_state(agent.device_id, "ACTIVE", version)
    wait_for(lambda: agent.deployer.idle(), 10, "deployer idle")
    return agent


def _publish_desired(cloud: Cloud, device_id: str, payload: str) -> None:
    host, port = cloud.context.urls.mqtt_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"attacker-{device_id}")
    client.connect(host, int(port))
    client.loop_start()
    client.publish(
        topics.device_topic(device_id, DeviceTopic.DESIRED), payload, qos=1
    ).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def _document(
    cloud: Cloud, agent: Agent, *, rev: int, lifetime: timedelta = timedelta(hours=1)
) -> DesiredState:
    with cloud.context.database.session() as s:
        row = repository.get_version(s, model_name="digits-edge", version=1)
        manifest = manifest_for(row)
    now = datetime.now(UTC)
    return DesiredState(
        device_id=agent.device_id,
        rev=rev,
        issued_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=2) + lifetime,
        deployments=[Deployment(manifest=manifest)],
    )


def _refusal(cloud: Cloud, agent: Agent, contains: str) -> None:
    def refused() -> bool:
        return any(
            e["state"] == "FAILED" and e["model"] is None and contains in (e["reason"] or "")
            for e in cloud.events(agent.device_id)
        )

    wait_for(refused, 10, f"a refusal mentioning {contains!r}")


def test_a_corrupted_chunk_is_asked_for_again_and_the_model_lands(
    embedded_cloud: Cloud,
    reference_onnx: dict[str, bytes],
    agent_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    version = embedded_cloud.register("digits-edge", reference_onnx["digits-edge"])
    store = embedded_cloud.context.artifacts
    original = store.read_chunk
    corrupted: list[int] = []

    def flaky(sha256: str, index: int, *, chunk_size: int | None = None) -> bytes:
        data = original(sha256, index, chunk_size=chunk_size)
        if index == 0 and not corrupted:
            corrupted.append(index)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    monkeypatch.setattr(store, "read_chunk", flaky)
    agent = embedded_cloud.start_agent(embedded_cloud.agent_settings(agent_dir, chunk_wait_s=0.5))
    _deploy(embedded_cloud, agent, version)
    embedded_cloud.wait_state(agent.device_id, "ACTIVE", version)
    assert corrupted == [0]
    assert agent.deployer.fetcher.rejected_chunks >= 1  # type: ignore[attr-defined]
    _serving(agent, version)


def test_a_tampered_artifact_never_activates_and_the_old_model_keeps_serving(
    embedded_cloud: Cloud, v1_agent: Agent
) -> None:
    v2 = embedded_cloud.register("digits-edge", tiny_classifier(features=64, classes=10, seed=3))
    with embedded_cloud.context.database.session() as s:
        sha = repository.get_version(s, model_name="digits-edge", version=v2).artifact_sha256
    path = embedded_cloud.context.artifacts.path(sha)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the cloud's copy is tampered with on disk
    path.write_bytes(bytes(data))
    _deploy(embedded_cloud, v1_agent, v2)
    failed = embedded_cloud.wait_state(v1_agent.device_id, "FAILED", v2, timeout=60)
    assert "failed their hash" in failed["reason"]
    embedded_cloud.wait_state(v1_agent.device_id, "ROLLED_BACK", v2)
    _serving(v1_agent, 1)


def test_a_document_signed_by_another_key_is_refused(
    embedded_cloud: Cloud, v1_agent: Agent
) -> None:
    forged = sign(_document(embedded_cloud, v1_agent, rev=99), generate_key())
    _publish_desired(embedded_cloud, v1_agent.device_id, forged.model_dump_json())
    _refusal(embedded_cloud, v1_agent, "unknown key")
    _serving(v1_agent, 1)
    assert v1_agent.store.state.rev_applied == 1


def test_a_lower_rev_is_refused(embedded_cloud: Cloud, v1_agent: Agent) -> None:
    """Raise the applied rev to 5 first, then replay a validly signed rev 3."""
    key = embedded_cloud.context.signing_key
    _publish_desired(
        embedded_cloud,
        v1_agent.device_id,
        sign(
            _document(embedded_cloud, v1_agent, rev=5, lifetime=timedelta(hours=4)), key
        ).model_dump_json(),
    )
    wait_for(lambda: v1_agent.store.state.rev_applied == 5, 10, "rev 5 applied")
    stale = sign(_document(embedded_cloud, v1_agent, rev=3, lifetime=timedelta(hours=4)), key)
    _publish_desired(embedded_cloud, v1_agent.device_id, stale.model_dump_json())
    _refusal(embedded_cloud, v1_agent, "anti-rollback")
    assert v1_agent.store.state.rev_applied == 5
    _serving(v1_agent, 1)


def test_an_expired_document_is_refused(embedded_cloud: Cloud, v1_agent: Agent) -> None:
    expired = sign(
        _document(embedded_cloud, v1_agent, rev=50, lifetime=timedelta(hours=1)),
        embedded_cloud.context.signing_key,
    )
    _publish_desired(embedded_cloud, v1_agent.device_id, expired.model_dump_json())
    _refusal(embedded_cloud, v1_agent, "expired")
    assert v1_agent.store.state.rev_applied == 1
    _serving(v1_agent, 1)


def test_garbage_on_the_desired_topic_is_refused_and_the_loop_lives(
    embedded_cloud: Cloud, v1_agent: Agent
) -> None:
    _publish_desired(embedded_cloud, v1_agent.device_id, "{not json at all")
    _refusal(embedded_cloud, v1_agent, "malformed")
    _serving(v1_agent, 1)
    assert v1_agent.link.connected


def test_a_model_that_fails_its_health_check_is_rolled_back(
    embedded_cloud: Cloud, v1_agent: Agent, reference_onnx: dict[str, bytes]
) -> None:
    wrong = HealthCheckSpec(
        golden=[
            GoldenExample(inputs={"input": X[0].tolist()}, outputs={"probabilities": [0.1] * 10})
        ],
        atol=1e-3,
    )
    v2 = embedded_cloud.register(
        "digits-edge", reference_onnx["digits-edge-weak"], healthcheck=wrong
    )
    _deploy(embedded_cloud, v1_agent, v2)
    failed = embedded_cloud.wait_state(v1_agent.device_id, "FAILED", v2)
    assert failed["reason"].startswith("HEALTHCHECK: golden input 0")
    rolled = embedded_cloud.wait_state(v1_agent.device_id, "ROLLED_BACK", v2)
    assert rolled["reason"] == "kept digits-edge:1"
    _serving(v1_agent, 1)
    assert v1_agent.store.active("digits-edge").version == 1  # type: ignore[union-attr]


def test_swapping_models_under_continuous_traffic_loses_no_request(
    embedded_cloud: Cloud, v1_agent: Agent, reference_onnx: dict[str, bytes]
) -> None:
    v2 = embedded_cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    v3 = embedded_cloud.register("digits-edge", tiny_classifier(features=64, classes=10, seed=7))
    sent, answered, errors, versions = [0], [0], [], set()
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            sent[0] += 1
            try:
                answer = v1_agent.infer("digits-edge", {"input": X[:2]})
                versions.add(answer.version)
                answered[0] += 1
            except Exception as exc:
                errors.append(repr(exc))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for version in (v2, v3):
            _deploy(embedded_cloud, v1_agent, version)
            embedded_cloud.wait_state(v1_agent.device_id, "ACTIVE", version)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert answered[0] == sent[0] > 100
    assert versions == {1, v2, v3}


def test_local_inference_is_unaffected_when_the_cloud_is_down(
    embedded_cloud: Cloud, v1_agent: Agent, agent_dir: Path
) -> None:
    """Every input is 'hard' and the cloud URL is dead: answers come back local, flagged
    degraded, fast — and the breaker stops even trying after a few failures."""
    settings = v1_agent.settings.model_copy(
        update={
            "cloud_url": f"http://127.0.0.1:{free_port()}",
            "routing_override": RoutingSpec(policy="max_prob", threshold=1.01),
            "data_dir": v1_agent.settings.data_dir,
        }
    )
    v1_agent.stop()
    embedded_cloud.agents.remove(v1_agent)
    agent = Agent(settings)
    agent.start(serve_api=False)
    embedded_cloud.agents.append(agent)
    latencies = []
    for _ in range(20):
        answer = agent.infer("digits-edge", {"input": X[:1]})
        assert answer.source == "edge"
        assert answer.degraded
        latencies.append(answer.latency_ms)
    assert max(latencies) < 1000
    assert np.median(latencies) < 50
    assert agent.cloud.breaker.open
    # And with the fleet service gone too, serving goes on.
    embedded_cloud.fleet.stop()
    _serving(agent, 1)
