"""The rounds of a federated run over a Flower Grid: find the devices the run is for, send
each the global head, aggregate what comes back with a Flower strategy (FedAvg weighted by
examples, FedProx, optionally wrapped in server-side DP), and report every round.

Flower's ``Strategy.start`` cannot be told which nodes to use, waits without end for its
minimum, and keeps asking a node that died; this loop keeps Flower's strategies for
configuring and aggregating, and decides itself who takes part:

- a node is asked once who it is (a QUERY message); only nodes whose device id the run
  names take part;
- a node that does not answer in time is dropped for the rest of the run (a SuperNode that
  restarts comes back as a new node and is asked again);
- a round needs ``min_clients`` updates; fewer devices within ``wait_for_clients_s``, or
  fewer updates in a round, ends the run TOO_FEW_CLIENTS with the reasons.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedProx,
    Strategy,
)
from flwr.supercore.run import Run

from cloud.federated.plan import Outcome, RoundReport, RunFiles, RunPlan

__all__ = ["make_strategy", "run_rounds"]

_LOGGER = logging.getLogger(__name__)
_QUERY_TIMEOUT_S = 60.0


class _Only(Grid):
    """The grid as the strategy sees it: only the nodes chosen for this round."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self._grid = grid
        self._nodes = list(nodes)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def make_strategy(plan: RunPlan, clients: int) -> Strategy:
    """FedAvg (or FedProx) over exactly ``clients`` nodes, wrapped in DP if the plan says."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": clients,
        "min_available_nodes": clients,
    }
    base: FedAvg
    if plan.strategy == "fedprox":
        base = FedProx(proximal_mu=plan.proximal_mu, **common)
    else:
        base = FedAvg(**common)
    if plan.dp is None:
        return base
    return DifferentialPrivacyServerSideFixedClipping(
        base,
        noise_multiplier=plan.dp.noise_multiplier,
        clipping_norm=plan.dp.clipping_norm,
        num_sampled_clients=clients,
    )


def _payload_bytes(content: RecordDict) -> int:
    return sum(
        len(array.data) for record in content.array_records.values() for array in record.values()
    )


@dataclass
class _Fleet:
    """What the run knows of the nodes: who each is, and who is out."""

    plan: RunPlan
    devices: dict[int, str] = field(default_factory=dict)
    out: dict[int, str] = field(default_factory=dict)  # node -> why it does not take part

    def selected(self, connected: Iterable[int]) -> list[int]:
        wanted = set(self.plan.devices)
        return sorted(n for n in connected if n not in self.out and self.devices.get(n) in wanted)

    def identify(self, grid: Grid, nodes: list[int]) -> None:
        config = ConfigRecord({"model": self.plan.model})
        messages = [Message(RecordDict({"config": config}), n, MessageType.QUERY) for n in nodes]
        replies = {
            m.metadata.src_node_id: m
            for m in grid.send_and_receive(
                messages, timeout=min(_QUERY_TIMEOUT_S, self.plan.round_timeout_s)
            )
        }
        for node in nodes:
            reply = replies.get(node)
            if reply is None:
                self.out[node] = "did not say who it is in time"
            elif reply.has_error():
                self.out[node] = f"refused: {reply.error.reason}"
            else:
                info = reply.content.config_records["device"]
                self.devices[node] = str(info["device-id"])
                if self.devices[node] not in self.plan.devices:
                    self.out[node] = "not selected for this run"

    def name(self, node: int) -> str:
        return self.devices.get(node, f"node {node}")


def _await_clients(
    grid: Grid, fleet: _Fleet, sleep: Callable[[float], None]
) -> tuple[list[int], str | None]:
    """The nodes for the next round, once ``min_clients`` are there; else the reason."""
    plan = fleet.plan
    deadline = time.monotonic() + plan.wait_for_clients_s
    while True:
        connected = list(grid.get_node_ids())
        unknown = [n for n in connected if n not in fleet.devices and n not in fleet.out]
        if unknown:
            fleet.identify(grid, unknown)
        selected = fleet.selected(connected)
        if len(selected) >= plan.min_clients:
            return selected, None
        if time.monotonic() >= deadline:
            ready = ", ".join(fleet.name(n) for n in selected) or "none"
            return selected, (
                f"{len(selected)} of the {plan.min_clients} devices needed were connected "
                f"within {plan.wait_for_clients_s:g}s (ready: {ready}; the run names "
                f"{len(plan.devices)} devices)"
            )
        sleep(1.0)


def run_rounds(
    grid: Grid, plan: RunPlan, files: RunFiles, *, sleep: Callable[[float], None] = time.sleep
) -> Outcome:
    """Run every round of ``plan``; returns how the run ended (also written to ``files``)."""
    arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in files.read_head("base").items()})
    fleet = _Fleet(plan)
    for server_round in range(1, plan.rounds + 1):
        waited = time.monotonic()
        nodes, short = _await_clients(grid, fleet, sleep)
        done = server_round - 1
        if short is not None:
            return _end(files, Outcome(state="TOO_FEW_CLIENTS", reason=short, rounds=done))
        started = time.monotonic()
        strategy = make_strategy(plan, len(nodes))
        messages = list(
            strategy.configure_train(server_round, arrays, _train_config(plan), _Only(grid, nodes))
        )
        replies = list(grid.send_and_receive(messages, timeout=plan.round_timeout_s))
        exchange = _Exchange(server_round, nodes, messages, replies)
        for node in exchange.dropped:
            fleet.out[node] = f"no reply in round {server_round} within {plan.round_timeout_s:g}s"
        aggregated, metrics = None, None
        if len(exchange.updates) >= plan.min_clients:
            aggregated, metrics = strategy.aggregate_train(server_round, replies)
        files.append_round(
            exchange.report(fleet, metrics, started, started - waited, aggregated is not None)
        )
        if aggregated is None:
            reason = exchange.shortfall(fleet, plan)
            return _end(files, Outcome(state="TOO_FEW_CLIENTS", reason=reason, rounds=done))
        arrays = aggregated
        files.write_head(f"round-{server_round}", {k: v.numpy() for k, v in arrays.items()})
        _LOGGER.info("run %s round %s: %d updates", plan.run_id, server_round, len(replies))
    files.write_head("result", {k: v.numpy() for k, v in arrays.items()})
    return _end(files, Outcome(state="COMPLETED", rounds=plan.rounds))


@dataclass
class _Exchange:
    """One round's messages and replies, sorted into updates, refusals and silence."""

    server_round: int
    nodes: list[int]
    messages: list[Message]
    replies: list[Message]

    @property
    def updates(self) -> list[Message]:
        return [r for r in self.replies if not r.has_error()]

    @property
    def refused(self) -> dict[int, str]:
        return {r.metadata.src_node_id: r.error.reason or "" for r in self.replies if r.has_error()}

    @property
    def dropped(self) -> list[int]:
        answered = {r.metadata.src_node_id for r in self.replies}
        return [n for n in self.nodes if n not in answered]

    def report(
        self,
        fleet: _Fleet,
        metrics: MetricRecord | None,
        started: float,
        waited_s: float,
        aggregated: bool,
    ) -> RoundReport:
        loss = metrics.get("train-loss") if metrics is not None else None
        updates = [
            {
                "device": fleet.name(r.metadata.src_node_id),
                "node": str(r.metadata.src_node_id),
                "examples": int(_metric(r, "num-examples")),
                "loss": _metric(r, "train-loss"),
                "loss_before": _metric(r, "loss-before"),
            }
            for r in self.updates
        ]
        refused = [{"device": fleet.name(n), "reason": why} for n, why in self.refused.items()]
        return RoundReport(
            round=self.server_round,
            clients=len(self.updates),
            dropped=len(self.dropped),
            refused=len(self.refused),
            examples=sum(int(_metric(r, "num-examples")) for r in self.updates),
            train_loss=float(loss) if isinstance(loss, int | float) else None,
            wall_s=round(time.monotonic() - started, 3),
            bytes_down=sum(_payload_bytes(m.content) for m in self.messages),
            bytes_up=sum(_payload_bytes(r.content) for r in self.updates),
            detail={
                "aggregated": aggregated,
                "waited_s": round(waited_s, 3),
                "updates": updates,
                "refused": refused,
                "dropped": [fleet.name(n) for n in self.dropped],
            },
        )

    def shortfall(self, fleet: _Fleet, plan: RunPlan) -> str:
        reason = (
            f"round {self.server_round}: {len(self.updates)} updates, {plan.min_clients} "
            f"needed ({len(self.refused)} refused, {len(self.dropped)} without a reply in "
            f"{plan.round_timeout_s:g}s)"
        )
        for node, why in list(self.refused.items())[:5]:
            reason += f"; {fleet.name(node)}: {why}"
        return reason[:2000]


def _metric(reply: Message, key: str) -> float:
    record = next(iter(reply.content.metric_records.values()))
    value = record.get(key, 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def _train_config(plan: RunPlan) -> ConfigRecord:
    train = plan.train
    return ConfigRecord(
        {
            "model": plan.model,
            "versions": "[" + ",".join(str(v) for v in plan.versions) + "]",
            "weight-name": plan.weight_name,
            "bias-name": plan.bias_name,
            "embedding-output": plan.embedding_output,
            "layout": plan.layout,
            "min-samples": plan.min_samples,
            "epochs": train.epochs,
            "learning-rate": train.learning_rate,
            "batch-size": train.batch_size,
            "optimizer": train.optimizer,
            "seed": train.seed,
        }
    )


def _end(files: RunFiles, outcome: Outcome) -> Outcome:
    files.write_outcome(outcome)
    return outcome
