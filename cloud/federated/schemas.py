"""Federated runs over REST: what starting one takes (``RunCreate``) and what is shown of one
(``RunPublic``, its rounds, the versions it made), apart from the ORM tables."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud.federated.plan import DpConfig, TrainSettings
from cloud.rollout.strategy import Strategy

__all__ = [
    "ACTIVE_RUN_STATES",
    "CANCELLABLE_RUN_STATES",
    "GateOptions",
    "RoundPublic",
    "RunCreate",
    "RunDetail",
    "RunPublic",
    "RunState",
]

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Label = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
INT32_MAX = 2**31 - 1


class RunState(StrEnum):
    PENDING = "PENDING"  # created; the coordinator submits it to the SuperLink
    RUNNING = "RUNNING"  # a Flower run: rounds going on
    FINALIZING = "FINALIZING"  # rounds done: gating and registering the result
    COMPLETED = "COMPLETED"  # a new version registered (and a canary started, if asked)
    GATE_FAILED = "GATE_FAILED"  # the result was refused by the gate: nothing registered
    TOO_FEW_CLIENTS = "TOO_FEW_CLIENTS"  # not enough devices connected or sent updates
    FAILED = "FAILED"  # the SuperLink refused the run, the ServerApp broke, or time ran out
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self not in ACTIVE_RUN_STATES


ACTIVE_RUN_STATES = (RunState.PENDING, RunState.RUNNING, RunState.FINALIZING)
# What an operator's cancel stops; a FINALIZING run is registering its result and finishes.
CANCELLABLE_RUN_STATES = (RunState.PENDING, RunState.RUNNING)


class GateOptions(BaseModel):
    """What the result must show on the cloud's held-out data before it is registered."""

    model_config = ConfigDict(extra="forbid")

    # Largest accuracy drop (points) against the base version on the base's held-out data.
    max_drop_pt: float = Field(default=3.0, ge=0, le=100)
    # Largest drop of the INT8 child against the new FP32 version (the pipeline's gate).
    int8_max_drop_pt: float = Field(default=0.5, ge=0, le=100)
    # A labelled sample of the distribution the run adapts to (e.g. builtin:digits-rotated-20):
    # the result must gain at least min_gain_pt on it.
    eval_dataset: str | None = Field(default=None, max_length=128)
    min_gain_pt: float = Field(default=0.0, ge=-100, le=100)


class RunCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelName
    base_version: int | None = Field(
        default=None, ge=1, le=INT32_MAX, description="an FP32 version (unset: the latest)"
    )
    rounds: int = Field(default=3, ge=1, le=100)
    min_clients: int = Field(default=2, ge=1, le=100_000)
    selector: dict[Label, Label] = Field(default_factory=dict, max_length=32)
    min_samples: int = Field(default=20, ge=1, le=1_000_000)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.1, ge=0, le=1000, description="FedProx only")
    dp: DpConfig | None = Field(default=None, description="Flower's server-side DP wrapper")
    train: TrainSettings = Field(default_factory=TrainSettings)
    wait_for_clients_s: float | None = Field(default=None, gt=0, le=86400)
    round_timeout_s: float | None = Field(default=None, gt=0, le=86400)
    gate: GateOptions = Field(default_factory=GateOptions)
    # A canary rollout of the new INT8 version to the run's devices, through the engine.
    rollout: Strategy | None = None


class RoundPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    round: int
    clients: int
    dropped: int
    refused: int
    examples: int
    train_loss: float | None
    wall_s: float
    bytes_down: int
    bytes_up: int
    detail: dict[str, Any]
    at: datetime


class RunPublic(BaseModel):
    id: int
    model: str
    base_version: int
    state: RunState
    reason: str | None
    rounds: int
    rounds_done: int
    selector: dict[str, str]
    flower_run_id: str | None
    result_version: int | None = Field(description="the new FP32 version")
    result_int8_version: int | None = Field(description="its INT8 child, what devices run")
    rollout_id: int | None
    cancellable: bool = Field(description="whether POST .../cancel stops it now")
    created_by: str
    created_at: datetime
    submitted_at: datetime | None
    updated_at: datetime
    finished_at: datetime | None


class RunDetail(RunPublic):
    config: dict[str, Any]
    metrics: dict[str, Any] = Field(description="gate scores, Flower's traffic, timings")
    round_metrics: list[RoundPublic]
