"""Protocol evolution on a real agent: a newer cloud's fields are read, a newer major refused."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from cloud.fleet.desired import manifest_for
from cloud.pipeline.reference.digits import digits_splits
from cloud.registry import repository
from edge_agent.agent import Agent
from shared import topics
from shared.messages import Deployment, DesiredState
from shared.signing import SignedEnvelope, key_id
from shared.topics import DeviceTopic
from tests.fleet_harness import Cloud, wait_for


@pytest.fixture
def agent(embedded_cloud: Cloud, reference_onnx: dict[str, bytes], agent_dir: Path) -> Agent:
    """An agent running digits-edge v1, deployed the ordinary way."""
    version = embedded_cloud.register("digits-edge", reference_onnx["digits-edge"])
    agent = embedded_cloud.start_agent(embedded_cloud.agent_settings(agent_dir))
    with embedded_cloud.admin() as c:
        r = c.put(f"/v1/devices/{agent.device_id}/deployments/digits-edge", json={"version": 1})
    assert r.status_code == 202, r.text
    embedded_cloud.wait_state(agent.device_id, "ACTIVE", version)
    wait_for(agent.deployer.idle, 10, "deployer idle")
    return agent


def _newer_cloud_document(cloud: Cloud, agent: Agent, rev: int, **top: Any) -> bytes:
    """What a newer cloud would sign: today's document plus fields this agent never saw."""
    with cloud.context.database.session() as s:
        manifest = manifest_for(repository.get_version(s, model_name="digits-edge", version=1))
    now = datetime.now(UTC)
    body = DesiredState(
        device_id=agent.device_id,
        rev=rev,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        deployments=[Deployment(manifest=manifest)],
    ).model_dump(mode="json")
    body["deployments"][0]["manifest"]["routing_curve"] = [[0.1, 0.7], [0.2, 0.8]]
    body["deployments"][0]["canary_group"] = "night"
    body.update(top)
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    key = cloud.context.signing_key
    return (
        SignedEnvelope(
            payload=base64.b64encode(payload).decode(),
            signature=base64.b64encode(key.sign(payload)).decode(),
            key_id=key_id(key.public_key()),
        )
        .model_dump_json()
        .encode()
    )


def _publish(cloud: Cloud, device_id: str, payload: bytes) -> None:
    host, port = cloud.context.urls.mqtt_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"newer-cloud-{device_id}")
    client.connect(host, int(port))
    client.loop_start()
    topic = topics.device_topic(device_id, DeviceTopic.DESIRED)
    client.publish(topic, payload, qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def test_agent_applies_a_signed_document_with_fields_it_does_not_know(
    embedded_cloud: Cloud, agent: Agent
) -> None:
    """Prepare a document with unknown fields at three levels; the agent applies it."""
    _publish(embedded_cloud, agent.device_id, _newer_cloud_document(embedded_cloud, agent, 50))

    event = wait_for(
        lambda: next((e for e in embedded_cloud.events(agent.device_id) if e["rev"] == 50), None),
        20,
        "a status for rev 50",
    )

    assert event["state"] == "ACTIVE"
    wait_for(lambda: agent.store.state.rev_applied == 50, 10, "rev 50 applied")


def test_agent_refuses_a_newer_major_schema_with_the_reason(
    embedded_cloud: Cloud, agent: Agent
) -> None:
    """A schema 2 document is refused and said so; the agent keeps serving v1."""
    document = _newer_cloud_document(embedded_cloud, agent, 60, schema_version=2)

    _publish(embedded_cloud, agent.device_id, document)

    refused = wait_for(
        lambda: next(
            (
                e
                for e in embedded_cloud.events(agent.device_id)
                if e["state"] == "FAILED" and "schema_version 2" in (e["reason"] or "")
            ),
            None,
        ),
        20,
        "the refusal",
    )
    assert "newer than this reader's 1" in refused["reason"]
    assert agent.store.state.rev_applied == 1
    assert agent.infer("digits-edge", {"input": digits_splits(0).x_test[:1]}).version == 1
