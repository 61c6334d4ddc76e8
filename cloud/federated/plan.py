"""What the cloud tells the ServerApp about a run, and what the ServerApp leaves behind: the
files of a run's directory, the one place the two processes share.

    plan.json      the run's plan (the coordinator writes it before submitting the run)
    base.npz       the head the run starts from
    rounds.jsonl   one line per finished round (the ServerApp appends)
    round-N.npz    the global head after round N
    outcome.json   how the ServerApp ended: COMPLETED (then result.npz), TOO_FEW_CLIENTS, FAILED
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import InvalidInput
from shared.fsutil import atomic_write

__all__ = ["DpConfig", "Outcome", "RoundReport", "RunFiles", "RunPlan", "TrainSettings"]

Array = npt.NDArray[Any]
OutcomeState = Literal["COMPLETED", "TOO_FEW_CLIENTS", "FAILED"]


class TrainSettings(BaseModel):
    """Each device's local training in a round (edge_agent.federated.head.TrainConfig)."""

    model_config = ConfigDict(extra="forbid")

    # Device buffers are small (a few hundred samples): 10 passes a round make progress that
    # 5 do not (B6: 3 rounds, 5 devices recover ~0.86 instead of ~0.8 of the centralized gain).
    epochs: int = Field(default=10, ge=1, le=1000)
    learning_rate: float = Field(default=0.02, gt=0, le=10)
    batch_size: int = Field(default=32, ge=1, le=65536)
    optimizer: Literal["adam", "sgd"] = "adam"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class DpConfig(BaseModel):
    """Flower's central DP with server-side fixed clipping: each update's change is clipped
    to ``clipping_norm``, and Gaussian noise of ``noise_multiplier`` * norm / clients is added
    to the average."""

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float = Field(ge=0, le=100)
    clipping_norm: float = Field(gt=0, le=1e6)


class RunPlan(BaseModel):
    model_config = ConfigDict(extra="forbid")

    run_id: int
    model: str
    base_version: int
    # Versions whose embedding the head reads (the same backbone): devices serving another
    # version do not take part.
    versions: list[int]
    devices: list[str] = Field(min_length=1)
    rounds: int = Field(ge=1, le=1000)
    min_clients: int = Field(ge=1)
    min_samples: int = Field(ge=1)
    wait_for_clients_s: float = Field(gt=0)
    round_timeout_s: float = Field(gt=0)
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.0, ge=0, le=1000)
    dp: DpConfig | None = None
    train: TrainSettings = Field(default_factory=TrainSettings)
    weight_name: str
    bias_name: str
    embedding_output: str
    layout: Literal["in_out", "out_in"] = "in_out"


class RoundReport(BaseModel):
    """One finished round, as the ServerApp saw it."""

    model_config = ConfigDict(extra="forbid")

    round: int
    clients: int
    dropped: int
    refused: int
    examples: int
    train_loss: float | None
    wall_s: float
    bytes_down: int
    bytes_up: int
    detail: dict[str, Any] = Field(default_factory=dict)


class Outcome(BaseModel):
    model_config = ConfigDict(extra="forbid")

    state: OutcomeState
    reason: str | None = None
    rounds: int = 0


@dataclass(frozen=True, slots=True)
class RunFiles:
    root: Path

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds.jsonl"

    def write_plan(self, plan: RunPlan) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(self.plan, plan.model_dump_json(indent=2).encode())

    def read_plan(self) -> RunPlan:
        return RunPlan.model_validate_json(self.plan.read_bytes())

    def write_head(self, name: str, head: dict[str, Array]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **head)  # type: ignore[arg-type]  # numpy's stub: allow_pickle
        atomic_write(self.root / f"{name}.npz", buffer.getvalue())

    def read_head(self, name: str) -> dict[str, Array]:
        path = self.root / f"{name}.npz"
        if not path.is_file():
            raise InvalidInput(f"run directory {self.root} has no {path.name}")
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    def append_round(self, report: RoundReport) -> None:
        line = report.model_dump_json() + "\n"
        with self.rounds.open("a") as out:
            out.write(line)
            out.flush()

    def read_rounds(self) -> list[RoundReport]:
        """Complete lines only: a line being written is read on the next look."""
        if not self.rounds.is_file():
            return []
        reports = []
        for line in self.rounds.read_text().splitlines(keepends=True):
            if line.endswith("\n") and line.strip():
                reports.append(RoundReport.model_validate(json.loads(line)))
        return reports

    def write_outcome(self, outcome: Outcome) -> None:
        atomic_write(self.outcome, outcome.model_dump_json().encode())

    def read_outcome(self) -> Outcome | None:
        if not self.outcome.is_file():
            return None
        return Outcome.model_validate_json(self.outcome.read_bytes())
