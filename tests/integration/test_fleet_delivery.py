"""Many devices, one artifact: all activate it, and the cloud's chunk broadcast is shared —
it publishes far fewer bytes than one download per device would."""

from __future__ import annotations

from pathlib import Path

from cloud.registry import repository
from tests.fleet_harness import Cloud
from tests.integration.test_crash_safety import _big_model

DEVICES = 8


def test_many_devices_share_one_broadcast(embedded_cloud: Cloud, agent_dir: Path) -> None:
    cloud = embedded_cloud
    version = cloud.register("digits-edge", _big_model(5))
    with cloud.context.database.session() as s:
        size = repository.get_version(s, model_name="digits-edge", version=version).artifact.size
    agents = [
        cloud.start_agent(cloud.agent_settings(agent_dir, chunk_wait_s=1.0)) for _ in range(DEVICES)
    ]
    cloud.fleet.chunks.window_s = 0.2  # a wider window: more requests answered together
    with cloud.admin() as c:
        for agent in agents:
            r = c.put(
                f"/v1/devices/{agent.device_id}/deployments/digits-edge", json={"version": version}
            )
            assert r.status_code == 202
    for agent in agents:
        cloud.wait_state(agent.device_id, "ACTIVE", version, timeout=90)
    published = cloud.fleet.chunks.bytes_published
    print(f"published {published / size:.2f} artifacts for {DEVICES} devices")
    assert published >= size
    # One download per device would be DEVICES * size; the broker did the fan-out.
    assert published < 0.5 * DEVICES * size, (
        f"{published / size:.1f} artifacts published for {DEVICES} devices"
    )
    assert cloud.fleet.chunks.requests >= DEVICES
