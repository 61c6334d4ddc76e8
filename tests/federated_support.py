"""Federated learning in tests: a device's data dir as the agent leaves it (an installed model
and a sample buffer), drifted digits, and an in-process Flower Grid that hands each message
to the real ClientApp (the transport only is replaced; the real federation runs in
tests/integration/test_federated_*.py)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from cloud.embedded.processes import free_port
from cloud.federated.bundle import write_app
from cloud.federated.coordinator import flower_cli
from cloud.federated.drift import device_shards
from cloud.federated.flower import FlowerCli, flower_command
from cloud.federated.plan import RunFiles, RunPlan
from cloud.federated.settings import FederatedSettings
from cloud.federated.superlink import SuperLink
from cloud.pipeline.reference.digits import digits_splits
from edge_agent.federated.client_app import app as client_app
from edge_agent.federated.supervisor import (
    SupernodeConfig,
    SupernodeSupervisor,
    write_node_config,
)
from edge_agent.samples import LabelSource, SampleBuffer
from shared.messages import ArtifactRef, Manifest, TensorSpec
from shared.retry import Backoff
from tests.pki import Pki

__all__ = [
    "Federation",
    "LocalGrid",
    "add_samples",
    "device_dir",
    "drifted_shards",
    "edge_model",
    "federation",
    "flower_identity",
    "wait_until",
]

MODEL = "digits-edge"


@functools.cache
def edge_model() -> bytes:
    """The digits-edge FP32 reference model (a couple of seconds, once per process)."""
    from cloud.pipeline.reference.digits import build_edge

    return build_edge(digits_splits(0))


def flower_identity() -> None:
    """What Flower's own processes set before a Message can be made."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


def _manifest(data: bytes, version: int) -> Manifest:
    return Manifest(
        model=MODEL,
        version=version,
        precision="fp32",
        artifact=ArtifactRef.of(data, 64 * 1024),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[
            TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10]),
            TensorSpec(name="embedding", datatype="FP32", shape=[-1, 32]),
        ],
        trainable=["head.weight", "head.bias"],
    )


def device_dir(root: Path, model: bytes, *, device_id: str = "dev-1", version: int = 1) -> Path:
    """A data dir where ``model`` is the active version of digits-edge, as the agent's
    ModelStore would have left it, with an empty sample buffer."""
    data_dir = root / device_id
    store = data_dir / "store"
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    manifest = _manifest(model, version)
    (store / "blobs" / manifest.artifact.sha256).write_bytes(model)
    state = {
        "rev_applied": 1,
        "active": {MODEL: {"manifest": manifest.model_dump(mode="json"), "rollout_id": None}},
        "previous": {},
    }
    (store / "state.json").write_text(json.dumps(state))
    SampleBuffer(data_dir / "samples.db", max_samples=100_000, max_bytes=1 << 30).close()
    return data_dir


def add_samples(
    data_dir: Path,
    x: np.ndarray,
    y: np.ndarray,
    *,
    version: int = 1,
    source: LabelSource = LabelSource.FEEDBACK,
) -> None:
    buffer = SampleBuffer(data_dir / "samples.db", max_samples=100_000, max_bytes=1 << 30)
    try:
        buffer.add(MODEL, version, {"input": x.astype(np.float32)}, y.tolist(), source)
    finally:
        buffer.close()


def drifted_shards(
    count: int, *, degrees: float = 20.0, share: float = 0.5, per_device: int | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each device's local data: half-rotated digits from the training split."""
    return device_shards(count, degrees=degrees, share=share, per_device=per_device)


class LocalGrid(Grid):
    """Nodes are data dirs; a message is answered by the real ClientApp in this process.
    Nodes in ``silent`` say who they are, then never answer a train message (a SuperNode
    that died mid-round)."""

    def __init__(self, nodes: dict[int, tuple[Path, str]], silent: Iterable[int] = ()) -> None:
        flower_identity()
        self.nodes = nodes
        self.silent = set(silent)
        self.sent: list[Message] = []
        self.timeouts: list[float | None] = []

    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return [NodeInfo(node_id=n) for n in self.nodes]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node not in self.nodes:
                continue
            if node in self.silent and message.metadata.message_type == "train":
                continue
            data_dir, device_id = self.nodes[node]
            context = Context(
                run_id=1, node_id=node, state=RecordDict(), run_config={},
                node_config={"data-dir": str(data_dir), "device-id": device_id},
            )  # fmt: skip
            replies.append(client_app(message, context))
        return replies


# -- a real federation: SuperLink, SuperNodes, a submitted run ------------------------------


@dataclass
class Federation:
    """A running SuperLink and what talks to it."""

    link: SuperLink
    settings: FederatedSettings
    cli: FlowerCli
    cloud_dir: Path
    ca_file: Path | None

    def supernode(
        self, data_dir: Path, device_id: str, *, key: Path | None = None
    ) -> SupernodeSupervisor:
        """The agent's supervisor running a real `flower-supernode` for this device."""
        home = data_dir / "flower"
        supervisor = SupernodeSupervisor(
            SupernodeConfig(
                command=[flower_command("flower-supernode")],
                superlink=self.settings.fleet_address,
                node_config_file=write_node_config(
                    home / "node.toml", device_id=device_id, data_dir=data_dir
                ),
                home=home,
                log_path=data_dir / "logs" / "supernode.log",
                root_certificates=self.ca_file,
                insecure=self.ca_file is None,
                private_key=key,
                connect_timeout_s=10.0,
            ),
            backoff=Backoff(base=0.5, cap=2.0),
        )
        supervisor.start()
        return supervisor

    def submit(self, plan: RunPlan, base: dict[str, np.ndarray]) -> RunFiles:
        """What the coordinator does: the plan and base head in a run dir, then `flwr run`."""
        files = RunFiles(self.cloud_dir / "federated" / "runs" / str(plan.run_id))
        files.write_plan(plan)
        files.write_head("base", base)
        config = files.root / "run-config.toml"
        config.write_text(f'run-dir = "{files.root}"\n')
        self.cli.run(write_app(self.cloud_dir / "federated" / "app"), config)
        return files


@contextmanager
def federation(root: Path, *, pki: Pki | None = None, auth: bool = False) -> Iterator[Federation]:
    """A SuperLink on a free port: TLS and SuperNode authentication with ``pki``, else the
    dev-mode plain-HTTP one."""
    tls: dict[str, object] = {}
    if pki is not None:
        tls = {"ssl_certfile": pki.server_cert, "ssl_keyfile": pki.server_key,
               "ssl_ca_certfile": pki.ca_file}  # fmt: skip
    settings = FederatedSettings(
        host="127.0.0.1", port=free_port(), internal_port=free_port(), supernode_auth=auth, **tls
    )
    cloud_dir = root / "cloud"
    link = SuperLink(settings, data_dir=cloud_dir, dev_mode=pki is None)
    link.start()
    try:
        yield Federation(
            link, settings, flower_cli(cloud_dir, settings), cloud_dir,
            pki.ca_file if pki is not None else None,
        )  # fmt: skip
    finally:
        link.stop()


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, *, interval: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
