"""Faults a simulated device can be given: chunks lost on the way in, a slow device, and a
restart in the middle of a download. Each acts on the real delivery path, just before the
chunk reaches the real store (or, for a restart, just after it did)."""

from __future__ import annotations

import functools
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.delivery import MqttDelivery
from shared.messages import ArtifactRef

__all__ = ["AgentFaults", "FaultCounters", "FaultyDelivery", "delivery_with"]


class AgentFaults(BaseModel):
    """One simulated device's faults."""

    model_config = ConfigDict(extra="forbid")

    chunk_loss: float = Field(default=0.0, ge=0.0, lt=1.0, description="share of chunks lost")
    chunk_delay_s: float = Field(default=0.0, ge=0.0, le=10.0, description="per chunk received")
    restart_mid_download: bool = False


@dataclass
class FaultCounters:
    """What the faults did, for the worker's report (shared by a process's agents)."""

    chunks_seen: int = 0
    chunks_dropped: int = 0
    restarts_asked: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


class FaultyDelivery(MqttDelivery):
    """The agent's MQTT delivery with a device's faults applied to each chunk it receives.

    ``on_restart`` is called once, on the network thread, when a restart is due: the worker
    then stops this agent and starts a fresh one on the same data dir (from another thread:
    stopping joins this one)."""

    def __init__(
        self,
        *args: Any,
        faults: AgentFaults,
        counters: FaultCounters,
        rng: random.Random,
        on_restart: Callable[[str], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.faults = faults
        self.counters = counters
        self.fault_rng = rng
        self.on_restart = on_restart
        self._restart_due = faults.restart_mid_download

    def store_chunk(self, ref: ArtifactRef, index: int, payload: bytes) -> None:
        self.counters.add(chunks_seen=1)
        if self.faults.chunk_delay_s:
            time.sleep(self.faults.chunk_delay_s)  # a slow device: its broker queue grows
        if self.faults.chunk_loss and self.fault_rng.random() < self.faults.chunk_loss:
            self.counters.add(chunks_dropped=1)
            return
        super().store_chunk(ref, index, payload)
        if self._restart_due and self.store.bytes_done(ref) and not self.store.complete(ref):
            self._restart_due = False
            self.counters.add(restarts_asked=1)
            self.on_restart(self.device_id)


def delivery_with(
    faults: AgentFaults,
    counters: FaultCounters,
    *,
    seed: int,
    on_restart: Callable[[str], None],
) -> Callable[..., MqttDelivery]:
    """What ``Agent(mqtt_delivery=...)`` takes for a device with ``faults`` (none: the plain
    delivery)."""
    if faults == AgentFaults():
        return MqttDelivery
    return functools.partial(
        FaultyDelivery,
        faults=faults,
        counters=counters,
        rng=random.Random(seed),  # noqa: S311 - simulated loss, not a secret
        on_restart=on_restart,
    )
