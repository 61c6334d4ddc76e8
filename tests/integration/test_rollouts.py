"""Rollouts with real agents through the embedded broker and the real cloud: waves that
advance only on health-checked ACTIVE, a broken model stopped at its canary and rolled back,
a silent device timing out, pause/resume, abort mid-download, supersession."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select

from cloud.registry.tables import AuditEvent
from edge_agent.agent import Agent
from shared.messages import GoldenExample, HealthCheckSpec
from tests.fleet_harness import Cloud, wait_for
from tests.integration.test_crash_safety import _big_model

FAST = {"device_timeout_s": 60, "growth": 2, "canary": 1}


def _label(cloud: Cloud, agents: list[Agent]) -> None:
    from cloud.registry.tables import Device

    with cloud.context.database.session() as s:
        for agent in agents:
            device = s.get(Device, agent.device_id)
            assert device is not None
            device.labels = {"site": "lab"}


def _start(cloud: Cloud, version: int, **strategy: Any) -> dict[str, Any]:
    with cloud.admin() as c:
        r = c.post(
            "/v1/rollouts",
            json={"model": "digits-edge", "version": version, "selector": {"site": "lab"},
                  "strategy": FAST | strategy},
        )  # fmt: skip
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def _rollout(cloud: Cloud, rollout_id: int) -> dict[str, Any]:
    with cloud.admin() as c:
        body: dict[str, Any] = c.get(f"/v1/rollouts/{rollout_id}").json()
    return body


def _until(cloud: Cloud, rollout_id: int, state: str, timeout: float = 60) -> dict[str, Any]:
    return wait_for(  # type: ignore[no-any-return]
        lambda: (r := _rollout(cloud, rollout_id))["state"] == state and r, timeout,
        f"rollout {rollout_id} {state}",
    )  # fmt: skip


def _serving(agent: Agent) -> int | None:
    model = agent.runtime.models().get("digits-edge")
    return model.version if model else None


def _on_v1(cloud: Cloud, agents: list[Agent], reference_onnx: dict[str, bytes]) -> int:
    _label(cloud, agents)
    v1 = cloud.register("digits-edge", reference_onnx["digits-edge"])
    rollout = _start(cloud, v1, canary=5)
    _until(cloud, rollout["id"], "COMPLETED")
    assert {_serving(a) for a in agents} == {v1}
    return v1


def _activations(cloud: Cloud, version: int) -> set[str]:
    """Devices that ever reported ACTIVE on ``version``."""
    return {
        agent.device_id
        for agent in cloud.agents
        if any(
            e["state"] == "ACTIVE" and e["version"] == version
            for e in cloud.events(agent.device_id)
        )
    }


def test_canary_then_waves_then_complete(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """Five devices, canary 1, growth 2: waves of 1, 2, 2, each opened only after the one
    before is ACTIVE; the rollout completes and every device serves the new version."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(5)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    rollout = _start(cloud, v2)
    assert [w["devices"] for w in rollout["progress"]] == [1, 2, 2]
    done = _until(cloud, rollout["id"], "COMPLETED")
    assert done["states"] == {"ACTIVE": 5}
    assert {_serving(a) for a in agents} == {v2}
    # Each wave's deploys were issued after the previous wave's last ACTIVE.
    with cloud.context.database.session() as s:
        deploys = s.scalars(
            select(AuditEvent).where(AuditEvent.actor == f"rollout:{rollout['id']}",
                                     AuditEvent.action == "device.deploy")
        ).all()  # fmt: skip
    assert len(deploys) == 5  # one per device: no wave sent twice
    assert v1 != v2


def test_a_broken_model_stops_at_the_canary_and_the_canary_goes_back(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A model whose health check fails: the canary reports FAILED (never ACTIVE), the
    rollout aborts, no other device is ever sent it, and the canary is confirmed back on v1."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(5)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    wrong = HealthCheckSpec(
        golden=[GoldenExample(inputs={"input": [0.0] * 64}, outputs={"probabilities": [0.1] * 10})],
        atol=1e-4,
    )
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"], healthcheck=wrong)
    rollout = _start(cloud, v2)
    aborted = _until(cloud, rollout["id"], "ABORTED")
    assert aborted["states"] == {"REVERTED": 1, "SKIPPED": 4}
    assert "1 of 1 devices failed" in aborted["reason"]
    assert _activations(cloud, v2) == set()
    assert {_serving(a) for a in agents} == {v1}
    with cloud.admin() as c:
        targets = c.get(f"/v1/rollouts/{rollout['id']}/targets").json()["items"]
    canary = next(t for t in targets if t["wave"] == 0)
    assert canary["state"] == "REVERTED"
    desired = cloud.context.database  # the canary's desired state names v1 again
    with desired.session() as s:
        from cloud.fleet.desired import stored_state
        from cloud.registry.tables import Device

        device = s.get(Device, canary["device_id"])
        assert device is not None
        state = stored_state(device)
        assert state is not None
        assert [d.manifest.version for d in state.deployments] == [v1]


def test_a_silent_device_times_out_and_counts_as_failed(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """One enrolled device never connects: with a 3 s timeout and a tolerant failure
    threshold the others complete, and the silent one is FAILED 'timed out'."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(2)]
    silent, _ = cloud.enroll()
    v1 = _on_v1(cloud, agents, reference_onnx)
    from cloud.registry.tables import Device

    with cloud.context.database.session() as s:
        device = s.get(Device, silent)
        assert device is not None
        device.labels = {"site": "lab"}
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    rollout = _start(
        cloud, v2, canary=3, device_timeout_s=3, failure_threshold=0.5, success_threshold=0.6
    )
    done = _until(cloud, rollout["id"], "COMPLETED")
    assert done["states"] == {"ACTIVE": 2, "FAILED": 1}
    with cloud.admin() as c:
        failed = c.get(f"/v1/rollouts/{rollout['id']}/targets", params={"state": "FAILED"}).json()
    assert failed["total"] == 1
    assert failed["items"][0]["device_id"] == silent
    assert "timed out" in failed["items"][0]["reason"]
    assert v1 != v2


def test_pause_holds_the_next_wave_and_resume_finishes(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(3)]
    _on_v1(cloud, agents, reference_onnx)
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    cloud.fleet.rollouts.stop()  # nothing moves until we say so
    rollout = _start(cloud, v2)
    with cloud.admin() as c:
        paused = c.post(f"/v1/rollouts/{rollout['id']}/pause")
        assert paused.status_code == 200
        assert c.post(f"/v1/rollouts/{rollout['id']}/pause").status_code == 409
    cloud.fleet.rollouts.start()
    wait_for(lambda: cloud.fleet.rollouts.rounds >= 3, 10, "engine rounds")
    assert _rollout(cloud, rollout["id"])["states"] == {"PENDING": 3}
    with cloud.admin() as c:
        assert c.post(f"/v1/rollouts/{rollout['id']}/resume").status_code == 200
    assert _until(cloud, rollout["id"], "COMPLETED")["states"] == {"ACTIVE": 3}


def test_a_newer_rollout_supersedes_the_older(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A rollout still at its canary is superseded by a newer one of the same model: it
    ends SUPERSEDED with its unreached devices SKIPPED, and the newer one completes."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(3)]
    _on_v1(cloud, agents, reference_onnx)
    v2 = cloud.register("digits-edge", reference_onnx["digits-edge-weak"])
    v3 = cloud.register("digits-edge", reference_onnx["digits-edge"])
    cloud.fleet.rollouts.stop()
    older = _start(cloud, v2)
    newer = _start(cloud, v3, canary=3)
    cloud.fleet.rollouts.start()
    ended = _rollout(cloud, older["id"])
    assert ended["state"] == "SUPERSEDED"
    assert ended["superseded_by"] == newer["id"]
    assert ended["states"] == {"SKIPPED": 3}
    assert _until(cloud, newer["id"], "COMPLETED")["states"] == {"ACTIVE": 3}
    assert {_serving(a) for a in agents} == {v3}


def test_an_abort_while_devices_download_takes_them_back(
    embedded_cloud: Cloud, agent_dir: Path, reference_onnx: dict[str, bytes]
) -> None:
    """A large model downloading slowly on all three devices; the operator aborts: every
    device is sent back to v1 and confirms it, none ends up serving the new version."""
    cloud = embedded_cloud
    agents = [cloud.start_agent(cloud.agent_settings(agent_dir)) for _ in range(3)]
    v1 = _on_v1(cloud, agents, reference_onnx)
    v2 = cloud.register("digits-edge", _big_model(6))
    cloud.fleet.chunks.rate = 256 * 1024  # bytes/s: the download takes a while
    rollout = _start(cloud, v2, canary=3)
    wait_for(
        lambda: any(
            e["state"] == "DOWNLOADING" and e["version"] == v2
            for a in agents for e in cloud.events(a.device_id)
        ),
        30, "a download under way",
    )  # fmt: skip
    with cloud.admin() as c:
        r = c.post(f"/v1/rollouts/{rollout['id']}/abort")
        assert r.status_code == 200, r.text
    cloud.fleet.chunks.rate = 32 * 1024 * 1024
    aborted = _until(cloud, rollout["id"], "ABORTED", timeout=90)
    assert aborted["reason"] == "aborted by admin"
    assert set(aborted["states"]) <= {"REVERTED"}
    wait_for(lambda: {_serving(a) for a in agents} == {v1}, 30, "every device on v1")
