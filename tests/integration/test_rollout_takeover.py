"""Two fleet replicas (`edgefleet serve --role fleet` processes) share the registry (PostgreSQL),
Redis and a Mosquitto, and split device reports through a shared subscription; one rollout
engine acts at a time. The leader is SIGKILLed mid-rollout: the other takes over within the
lease, and the rollout completes with every device deployed exactly once (no wave sent twice,
none skipped). The killed replica is restarted under its client id, as a supervisor would: Mosquitto
keeps a dead member's share of the reports in its session until it returns. A leader frozen
(SIGSTOP) past its lease and then thawed learns it was replaced and writes nothing more."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from cloud.context import CloudContext
from cloud.embedded.processes import free_port, wait_for_port
from cloud.embedded.services import ServiceUrls
from cloud.pipeline.golden import golden_examples
from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.registry.tables import AuditEvent, Rollout
from cloud.rollout.leader import Leadership
from cloud.rollout.store import create_rollout
from cloud.rollout.strategy import Strategy
from cloud.settings import CloudSettings
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared.signing import public_key_b64
from tests.conftest import ADMIN_TOKEN, _reset_postgres
from tests.fleet_harness import clear_retained, wait_for
from tests.mosquitto import mosquitto

DEVICES = 6
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


class Replica:
    """One `edgefleet serve --role fleet` process; started again under the same client id."""

    def __init__(self, env: dict[str, str], name: str, log: Path) -> None:
        self.env = env | {"EDGEFLEET_MQTT_CLIENT_ID": f"edgefleet-cloud-{name}"}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = free_port()
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [EDGEFLEET, "serve", "--role", "fleet", "--port", str(port)],
                env=self.env | {"EDGEFLEET_API_PORT": str(port)}, stdout=out, stderr=out,
            )  # fmt: skip
        wait_for_port("127.0.0.1", port, timeout=60, process=self.proc)  # type: ignore[arg-type]

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def shared_cloud(
    tmp_path: Path, postgres_server_url: str, embedded: ServiceUrls
) -> Iterator[tuple[CloudContext, dict[str, str], int]]:
    # The session's database outlives a test: start from an empty one (an artifact row left
    # by another test would point at a blob this test's artifact store does not have).
    _reset_postgres(postgres_server_url)
    with mosquitto(tmp_path / "broker") as port:
        mqtt_url = f"mqtt://127.0.0.1:{port}"
        settings = CloudSettings(
            data_dir=tmp_path / "cloud", admin_token=ADMIN_TOKEN, chunk_size=64 * 1024,
            database_url=postgres_server_url, mqtt_url=mqtt_url, redis_url=embedded.redis_url,
        )  # fmt: skip
        context = CloudContext.open(
            settings, ServiceUrls(postgres_server_url, mqtt_url, embedded.redis_url)
        )
        context.redis.flushdb()
        env = dict(os.environ) | {
            "EDGEFLEET_DATA_DIR": str(settings.data_dir),
            "EDGEFLEET_DATABASE_URL": postgres_server_url,
            "EDGEFLEET_MQTT_URL": mqtt_url,
            "EDGEFLEET_REDIS_URL": embedded.redis_url,
            "EDGEFLEET_ADMIN_TOKEN": ADMIN_TOKEN,
            "EDGEFLEET_DEV_MODE": "true",
            "EDGEFLEET_MQTT_SHARED_SUBSCRIPTION": "true",
            "EDGEFLEET_ROLLOUT_LEASE_S": "2",
            "EDGEFLEET_CHUNK_SIZE": str(64 * 1024),
        }
        try:
            yield context, env, port
        finally:
            context.close()


def _register(context: CloudContext, data: bytes) -> int:
    splits = digits_splits(0)
    with context.database.session() as s:
        try:
            repository.get_model(s, name="digits-edge")
        except Exception:
            repository.create_model(s, name="digits-edge")
        row = register_version(
            s, context.artifacts, model_name="digits-edge", blocks=[data], max_bytes=len(data),
            precision="fp32", actor="test",
            healthcheck=golden_examples(data, {"input": splits.x_test}),
        )  # fmt: skip
        s.flush()
        return row.version


def _agents(context: CloudContext, mqtt_port: int, data_dir: Path) -> list[Agent]:
    agents = []
    public = public_key_b64(context.signing_key.public_key())
    for index in range(DEVICES):
        device_id = f"rep-{index}"
        with context.database.session() as s:
            _device, token = repository.enroll_device(
                s, device_id=device_id, labels={"site": "lab"}
            )
        settings = AgentSettings(
            device_id=device_id, token=token, cloud_url="http://127.0.0.1:9",
            mqtt_url=f"mqtt://127.0.0.1:{mqtt_port}", public_key=public,
            data_dir=data_dir / device_id, api_port=0, telemetry_interval_s=0.5,
            chunk_wait_s=1.0,
        )  # fmt: skip
        agent = Agent(settings)
        agent.start(serve_api=False)
        agents.append(agent)
    for agent in agents:
        wait_for(lambda a=agent: a.link.connected, 15, "agent connected")  # type: ignore[misc]
    return agents


def _state(context: CloudContext, rollout_id: int) -> tuple[str, int]:
    with context.database.session() as s:
        rollout = s.get(Rollout, rollout_id)
        assert rollout is not None
        return rollout.state, rollout.current_wave


def test_a_killed_leader_is_replaced_and_the_rollout_completes_once(
    shared_cloud: tuple[CloudContext, dict[str, str], int],
    tmp_path: Path,
    reference_onnx: dict[str, bytes],
) -> None:
    context, env, mqtt_port = shared_cloud
    replicas = {n: Replica(env, n, tmp_path / f"replica-{n}.log") for n in ("0", "1")}
    agents: list[Agent] = []
    try:
        for replica in replicas.values():
            replica.start()
        agents = _agents(context, mqtt_port, tmp_path / "agents")
        leadership = Leadership(context.redis)
        wait_for(leadership.leader, 20, "a leader")
        version = _register(context, reference_onnx["digits-edge"])
        with context.database.session() as s:
            rollout = create_rollout(
                s, model="digits-edge", version=version, selector={"site": "lab"},
                strategy=Strategy(canary=1, growth=2, device_timeout_s=120),
            )  # fmt: skip
            rollout_id = rollout.id
        # Waves of 1, 2 and 3: kill the leader once the canary passed and wave 1 is out.
        wait_for(lambda: _state(context, rollout_id)[1] >= 1, 60, "wave 1 started")
        first = leadership.leader()
        assert first is not None
        pid = int(first.split(":")[1])
        killed = next(r for r in replicas.values() if r.proc and r.proc.pid == pid)
        killed.kill()
        wait_for(lambda: (who := leadership.leader()) is not None and who != first, 20,
                 "the other replica to take the lease")  # fmt: skip
        killed.start()  # a supervisor restarts it: its share of the reports comes back
        _completes_once(context, rollout_id, version, agents)
    finally:
        for agent in agents:
            agent.stop()
        for replica in replicas.values():
            replica.stop()
        clear_retained(f"mqtt://127.0.0.1:{mqtt_port}", [a.device_id for a in agents])


def test_a_frozen_leader_thawed_after_its_lease_is_deposed_and_writes_nothing(
    shared_cloud: tuple[CloudContext, dict[str, str], int],
    tmp_path: Path,
    reference_onnx: dict[str, bytes],
) -> None:
    """The leader is SIGSTOPped (a long GC pause, a VM freeze) once wave 1 is out, until the
    other replica has taken its 2 s lease (with a higher token). Thawed (SIGCONT), the old
    leader finds its lease gone and stands by: the new one finishes the rollout, with one
    `device.deploy` per device, and keeps the lease."""
    context, env, mqtt_port = shared_cloud
    replicas = [Replica(env, n, tmp_path / f"replica-{n}.log") for n in ("0", "1")]
    agents: list[Agent] = []
    frozen: Replica | None = None
    try:
        for replica in replicas:
            replica.start()
        agents = _agents(context, mqtt_port, tmp_path / "agents")
        leadership = Leadership(context.redis)
        wait_for(leadership.leader, 20, "a leader")
        version = _register(context, reference_onnx["digits-edge"])
        with context.database.session() as s:
            rollout_id = create_rollout(
                s, model="digits-edge", version=version, selector={"site": "lab"},
                strategy=Strategy(canary=1, growth=2, device_timeout_s=120),
            ).id  # fmt: skip
        wait_for(lambda: _state(context, rollout_id)[1] >= 1, 60, "wave 1 started")
        first = leadership.leader()
        assert first is not None
        frozen = next(r for r in replicas if r.proc and r.proc.pid == int(first.split(":")[1]))
        assert frozen.proc is not None
        frozen.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: (who := leadership.leader()) is not None and who != first, 20,
                 "the other replica to take the lease")  # fmt: skip
        second = leadership.leader()
        # Wave 2 waits for the thaw: the frozen replica holds its share of the reports.
        frozen.proc.send_signal(signal.SIGCONT)
        _completes_once(context, rollout_id, version, agents)
        assert leadership.leader() == second
        log = frozen.log.read_text(errors="replace")
        assert "lost the lease" in log or "deposed" in log, log[-2000:]
    finally:
        if frozen is not None and frozen.proc is not None and frozen.proc.poll() is None:
            frozen.proc.send_signal(signal.SIGCONT)
        for agent in agents:
            agent.stop()
        for replica in replicas:
            replica.stop()
        clear_retained(f"mqtt://127.0.0.1:{mqtt_port}", [a.device_id for a in agents])


def _completes_once(
    context: CloudContext, rollout_id: int, version: int, agents: list[Agent]
) -> None:
    """The rollout completes with one deploy per device, by a leader after the first."""
    wait_for(lambda: _state(context, rollout_id)[0] == "COMPLETED", 90, "completion")
    with context.database.session() as s:
        deploys = s.scalars(
            select(AuditEvent.subject).where(
                AuditEvent.actor == f"rollout:{rollout_id}",
                AuditEvent.action == "device.deploy",
            )
        ).all()
        fence = s.get(Rollout, rollout_id).fence  # type: ignore[union-attr]
    assert sorted(deploys) == sorted(a.device_id for a in agents), "each device once"
    assert fence >= 2, "the second leader's token wrote the end of the rollout"
    for agent in agents:
        served = agent.runtime.models().get("digits-edge")
        assert served is not None
        assert served.version == version
