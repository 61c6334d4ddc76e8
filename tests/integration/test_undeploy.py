"""Undeploy as a rollout, with real agents through the embedded broker and the real cloud:
waves that advance only once each agent has really unloaded the model (404 on its local API,
blob gone), an agent that never unloads it never counted done, an operator's abort putting
the model back; and a newer document mid-download that wins over the superseded version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from cloud.fleet.desired import stored_state
from cloud.registry.tables import AuditEvent, Device
from edge_agent.agent import Agent
from shared.messages import DeploymentState, StatusEvent
from tests.fleet_harness import Cloud, wait_for
from tests.integration.test_crash_safety import _big_model
from tests.integration.test_rollouts import _on_v1, _rollout, _serving, _until

ROW = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


def _undeploy(cloud: Cloud, **strategy: Any) -> dict[str, Any]:
    with cloud.admin() as c:
        r = c.post(
            "/v1/rollouts",
            json={"model": "digits-edge", "undeploy": True, "selector": {"site": "lab"},
                  "strategy": {"device_timeout_s": 60} | strategy},
        )  # fmt: skip
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _infer(agent: Agent) -> httpx.Response:
    assert agent.api is not None
    return httpx.post(f"{agent.api.url}/v2/models/digits-edge/infer", json=ROW, timeout=10)


def _states(cloud: Cloud, agent: Agent) -> list[tuple[str, int | None, int | None]]:
    """The agent's statuses, oldest first: (state, version, rollout id)."""
    events = reversed(cloud.events(agent.device_id))
    return [(e["state"], e["version"], e["rollout_id"]) for e in events]


def test_an_undeploy_takes_the_model_off_every_device_wave_by_wave(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """Three devices on v1, undeploy canary 1 growth 2: waves of 1 and 2, COMPLETED with
    every device REMOVED; each agent serves nothing (404 on its local API), holds no blob,
    and its desired document names no model. One agent loses its REMOVED status (as if it
    crashed between unloading and reporting): its reported state confirms it instead."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir), serve_api=True) for _ in range(3)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    assert _infer(agents[0]).status_code == 200
    lossy = agents[2]
    publish = lossy.deployer.publish_status

    def lose_removed(event: StatusEvent) -> None:
        if event.state is not DeploymentState.REMOVED:
            publish(event)

    lossy.deployer.publish_status = lose_removed

    rollout = _undeploy(cloud, canary=1, growth=2)
    assert rollout["undeploy"] is True
    assert rollout["version"] is None
    assert [w["devices"] for w in rollout["progress"]] == [1, 2]
    done = _until(cloud, rollout["id"], "COMPLETED")

    assert done["states"] == {"REMOVED": 3}
    for agent in agents:
        assert _serving(agent) is None
        answer = _infer(agent)
        assert answer.status_code == 404
        assert answer.json() == {"error": "no model 'digits-edge' is active on this device"}
        assert list(agent.store.blobs.iterdir()) == []
        assert agent.store.active("digits-edge") is None
        removed = ("REMOVED", v1, None) in _states(cloud, agent)
        assert removed is (agent is not lossy)
    with cloud.context.database.session() as s:
        for agent in agents:
            device = s.get(Device, agent.device_id)
            assert device is not None
            state = stored_state(device)
            assert state is not None
            assert state.deployments == []
        undeploys = s.scalars(
            select(AuditEvent).where(AuditEvent.actor == f"rollout:{rollout['id']}",
                                     AuditEvent.action == "device.undeploy")
        ).all()  # fmt: skip
    assert len(undeploys) == 3  # one per device: no wave sent twice


def test_an_agent_that_keeps_the_model_is_never_counted_removed(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """An agent from before undeploys existed applies the new rev but keeps serving the model
    (its reported state still lists it): the engine does not take the applied rev for a
    removal; the device times out FAILED while the other one is REMOVED."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(2)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    old = agents[0]
    old.deployer._remove_unnamed = lambda _state: None  # type: ignore[method-assign]
    rollout = _undeploy(
        cloud, canary=2, device_timeout_s=4, failure_threshold=0.9, success_threshold=0.5
    )
    done = _until(cloud, rollout["id"], "COMPLETED")
    assert done["states"] == {"REMOVED": 1, "FAILED": 1}
    with cloud.admin() as c:
        failed = c.get(f"/v1/rollouts/{rollout['id']}/targets", params={"state": "FAILED"}).json()
    assert [t["device_id"] for t in failed["items"]] == [old.device_id]
    assert "timed out" in failed["items"][0]["reason"]
    assert _serving(old) == v1
    assert old.store.state.rev_applied == failed["items"][0]["rev"]  # it did apply the rev


def test_an_aborted_undeploy_puts_the_model_back_where_it_was_dropped(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """One device a minute: the canary drops the model, the operator aborts; the canary gets
    v1 back (downloaded again, health-checked, ACTIVE for this rollout), the others were never
    touched (SKIPPED), and every device answers on v1."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir), serve_api=True) for _ in range(3)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    rollout = _undeploy(cloud, canary=1, max_devices_per_minute=1)
    wait_for(lambda: _rollout(cloud, rollout["id"])["states"].get("REMOVED"), 30, "canary gone")
    canary = next(a for a in agents if _serving(a) is None)
    assert _infer(canary).status_code == 404
    with cloud.admin() as c:
        assert c.post(f"/v1/rollouts/{rollout['id']}/abort").status_code == 200

    aborted = _until(cloud, rollout["id"], "ABORTED")
    assert aborted["states"] == {"REVERTED": 1, "SKIPPED": 2}
    wait_for(lambda: {_serving(a) for a in agents} == {v1}, 30, "every device on v1")
    assert _infer(canary).status_code == 200
    history = _states(cloud, canary)
    back = history.index(("ACTIVE", v1, rollout["id"]))
    assert history.index(("REMOVED", v1, None)) < back


def test_a_newer_document_mid_download_wins_and_the_superseded_version_never_activates(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """Two devices download v2 (2 MB) slowly; the operator points one of them at v3. That
    one drops the download at once (FAILED 'superseded'): v2 is never ACTIVE there, v3 is,
    although the chunks its neighbour still asks for keep reaching it (and delivery speeds
    up), so an agent that went on with v2 would have activated it before v3."""
    cloud = embedded_cloud
    moved, stays = (cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(2))
    v1 = cloud.register("digits-edge", reference_onnx["digits-edge"])
    v2 = cloud.register("digits-edge", _big_model(8))
    v3 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])

    def point(agent: Agent, version: int) -> None:
        url = f"/v1/devices/{agent.device_id}/deployments/digits-edge"
        with cloud.admin() as c:
            assert c.put(url, json={"version": version}).status_code == 202

    for agent in (moved, stays):
        point(agent, v1)
        cloud.wait_state(agent.device_id, "ACTIVE", v1)
    cloud.fleet.chunks.rate = 128 * 1024  # bytes/s: the 2 MB take ~16 s
    for agent in (moved, stays):
        point(agent, v2)
    wait_for(
        lambda: any(
            e["state"] == "DOWNLOADING" and e["version"] == v2 and e["bytes_done"] > 0
            for e in cloud.events(moved.device_id)
        ),
        30, "the v2 download under way",
    )  # fmt: skip
    point(moved, v3)
    cloud.fleet.chunks.rate = 32 * 1024 * 1024
    cloud.wait_state(moved.device_id, "ACTIVE", v3)
    cloud.wait_state(stays.device_id, "ACTIVE", v2, timeout=60)
    wait_for(moved.deployer.idle, 20, "the moved agent idle")

    assert ("ACTIVE", v2, None) not in _states(cloud, moved)
    failed = [e for e in cloud.events(moved.device_id) if e["state"] == "FAILED"]
    assert [e["version"] for e in failed] == [v2]
    assert "superseded by rev" in failed[0]["reason"]
    assert _serving(moved) == v3
    assert _serving(stays) == v2
    assert list(moved.store.partial.iterdir()) == []
