"""Local agents for `edgefleet demo`: enrolled through the API, run in this process, and
pointed at the INT8 edge model — the whole path, on one machine."""

from __future__ import annotations

import logging

import httpx

from cloud.context import CloudContext
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared.fsutil import atomic_write

__all__ = ["DemoFleet"]

_LOGGER = logging.getLogger(__name__)


class DemoFleet:
    def __init__(self, context: CloudContext, api_url: str, count: int) -> None:
        self.context = context
        self.api_url = api_url
        self.count = count
        self.agents: list[Agent] = []
        self._admin = httpx.Client(
            base_url=api_url,
            headers={"Authorization": f"Bearer {context.settings.admin_token}"},
            timeout=30,
        )

    def _settings(self, index: int) -> AgentSettings:
        device_id = f"demo-agent-{index}"
        home = self.context.settings.data_dir / "agents" / device_id
        config = home / "agent.json"
        if config.exists():
            return AgentSettings.model_validate_json(config.read_text())
        response = self._admin.post(
            "/v1/devices", json={"device_id": device_id, "labels": {"fleet": "demo"}}
        )
        response.raise_for_status()
        enrolled = response.json()
        settings = AgentSettings(
            device_id=device_id,
            token=enrolled["token"],
            cloud_url=self.api_url,
            mqtt_url=enrolled["mqtt_url"],
            public_key=enrolled["public_key"],
            data_dir=home,
            api_port=0,
            telemetry_interval_s=5,
        )
        home.mkdir(parents=True, exist_ok=True)
        atomic_write(config, settings.model_dump_json().encode())
        config.chmod(0o600)
        return settings

    def start(self, model: str = "digits-edge") -> list[str]:
        lines = []
        versions = self._admin.get(f"/v1/models/{model}/versions").json()
        int8 = [v["version"] for v in versions if v["precision"] == "int8"]
        for index in range(1, self.count + 1):
            settings = self._settings(index)
            # A demo restarted on the same data dir gets a fresh broker: the address moves.
            settings = settings.model_copy(
                update={"mqtt_url": self.context.urls.mqtt_url, "cloud_url": self.api_url}
            )
            agent = Agent(settings)
            agent.start(serve_api=True)
            self.agents.append(agent)
            if int8:
                self._admin.put(
                    f"/v1/devices/{settings.device_id}/deployments/{model}",
                    json={"version": int8[-1]},
                ).raise_for_status()
            assert agent.api is not None
            lines.append(
                f"{settings.device_id}: local API {agent.api.url} (POST /v2/models/{model}/infer)"
            )
        return lines

    def stop(self) -> None:
        for agent in self.agents:
            try:
                agent.stop()
            except Exception:
                _LOGGER.exception("stopping %s", agent.device_id)
        self._admin.close()
