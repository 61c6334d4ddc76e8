"""A real cloud (API over uvicorn + fleet service) and real agents, for integration tests."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt

from cloud.api.app import create_app
from cloud.context import CloudContext
from cloud.fleet.service import FleetService
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.register import register_version
from cloud.registry import repository
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared import topics
from shared.messages import HealthCheckSpec
from shared.topics import DeviceTopic
from tests.conftest import ADMIN_TOKEN, serve_in_thread


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Cloud:
    context: CloudContext
    fleet: FleetService
    url: str
    agents: list[Agent] = field(default_factory=list)

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def register(
        self,
        model: str,
        data: bytes,
        *,
        healthcheck: HealthCheckSpec | None = None,
        task: str = "classification",
    ) -> int:
        """Register ``data`` as the next version of ``model`` with golden examples from digits."""
        splits = digits_splits(0)
        with self.context.database.session() as s:
            try:
                repository.get_model(s, name=model)
            except Exception:
                repository.create_model(s, name=model, task=task)
            row = register_version(
                s, self.context.artifacts, model_name=model, blocks=[data], max_bytes=len(data),
                precision="fp32", actor="test",
                healthcheck=healthcheck or golden_examples(data, {"input": splits.x_test}),
            )  # fmt: skip
            s.flush()
            return row.version

    def enroll(self, device_id: str | None = None) -> tuple[str, dict[str, Any]]:
        device_id = device_id or f"dev-{uuid.uuid4().hex[:8]}"
        with self.admin() as c:
            enrolled = c.post("/v1/devices", json={"device_id": device_id}).json()
        return device_id, enrolled

    def agent_settings(
        self, data_dir: Path, device_id: str | None = None, **overrides: Any
    ) -> AgentSettings:
        device_id, enrolled = self.enroll(device_id)
        values: dict[str, Any] = {
            "device_id": device_id,
            "token": enrolled["token"],
            "cloud_url": self.url,
            "mqtt_url": self.context.urls.mqtt_url,
            "public_key": enrolled["public_key"],
            "data_dir": data_dir / device_id,
            "api_port": 0,
            "telemetry_interval_s": 0.5,
            "chunk_wait_s": 1.0,
        }
        return AgentSettings(**(values | overrides))

    def start_agent(self, settings: AgentSettings, *, serve_api: bool = False) -> Agent:
        agent = Agent(settings)
        agent.start(serve_api=serve_api)
        self.agents.append(agent)
        wait_for(lambda: agent.link.connected, 15, "agent MQTT connection")
        return agent

    def events(self, device_id: str) -> list[dict[str, Any]]:
        return self.fleet.events(device_id, 1000)

    def wait_state(
        self, device_id: str, state: str, version: int | None = None, timeout: float = 30
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for event in self.events(device_id):
                if event["state"] == state and (version is None or event["version"] == version):
                    return event
            return None

        return wait_for(found, timeout, f"{device_id} to report {state} v{version}")  # type: ignore[no-any-return]


def clear_retained(
    mqtt_url: str,
    device_ids: list[str],
    *,
    username: str | None = None,
    password: str | None = None,
) -> None:
    """The machine's Mosquitto keeps retained messages across runs: leave none behind.

    On a broker with logins, pass one that may write the devices' topics (the cloud's); a
    broker that is gone, or that refuses the login, has nothing this could clear.
    """
    host, port = mqtt_url.removeprefix("mqtt://").split(":")
    accepted = threading.Event()
    answered = threading.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            accepted.set()
        answered.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"cleaner-{uuid.uuid4().hex[:6]}"
    )
    if username is not None:
        client.username_pw_set(username, password)
    client.on_connect = on_connect
    try:
        client.connect(host, int(port))
    except OSError:
        return
    client.loop_start()
    try:
        if not (answered.wait(5) and accepted.is_set()):
            return
        for device_id in device_ids:
            for kind in (DeviceTopic.DESIRED, DeviceTopic.REPORTED, DeviceTopic.PRESENCE):
                client.publish(
                    topics.device_topic(device_id, kind), b"", qos=1, retain=True
                ).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


@contextmanager
def running_cloud(context: CloudContext) -> Iterator[Cloud]:
    fleet = FleetService(context)
    fleet.start()
    try:
        with serve_in_thread(create_app(context, fleet)) as url:
            cloud = Cloud(context, fleet, url)
            try:
                yield cloud
            finally:
                for agent in cloud.agents:
                    agent.stop()
                clear_retained(
                    context.urls.mqtt_url,
                    [a.device_id for a in cloud.agents],
                    username=context.settings.mqtt_username,
                    password=context.settings.mqtt_password,
                )
    finally:
        fleet.stop()
