"""Pydantic messages of the MQTT protocol (DESIGN.md §3).

Protocol evolution: a fleet runs mixed agent versions for months, so *readers are tolerant*
and *writers are strict*. Code that builds a message gets ``extra="forbid"`` (a typo is a bug);
:func:`decode`, the one way a received payload is read, ignores fields it does not know (at
every level) and refuses a newer *major* ``schema_version`` with a clear reason. New fields get
defaults that keep the old behaviour, so they need no new major version. Signed documents are
verified over the exact payload bytes before they are decoded, so unknown fields are still
covered by the signature.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from shared.errors import ProtocolError, UnsupportedSchema

__all__ = [
    "SCHEMA_VERSION",
    "ArtifactRef",
    "ArtifactRequest",
    "BudgetReport",
    "CloudBudget",
    "CloudModelRef",
    "CurvePoint",
    "DeploymentState",
    "DesiredState",
    "GoldenExample",
    "HealthCheckSpec",
    "Histogram",
    "LearnedRouter",
    "LearningState",
    "Manifest",
    "Message",
    "Part",
    "Presence",
    "PresenceState",
    "ReportedState",
    "RoutingPolicy",
    "RoutingSpec",
    "SecondOpinion",
    "StatusEvent",
    "Telemetry",
    "TensorSpec",
    "budget_payload",
    "decode",
    "read_budget",
]

# The major version this code reads and writes; minor additions never change it.
SCHEMA_VERSION = 1
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
TensorName = Annotated[str, Field(min_length=1, max_length=256)]
# Device reports are bounded in what they may hold (a hostile device must not fill the
# cloud's memory, Redis or SQL): counters and capabilities by name, models by count.
Key = Annotated[str, Field(min_length=1, max_length=64)]
MAX_CHUNKS = 65_536
# What the registry's columns hold (revs, versions and ids are int4 on PostgreSQL, byte
# counts int8): a report past them is malformed, refused before it reaches SQL.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
MAX_KEYS = 256
MAX_MODELS = 64
MAX_BUCKETS = 64


class Message(BaseModel):
    """Base of every protocol message: versioned, strict when written, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)

    @field_validator("schema_version")
    @classmethod
    def _known_major(cls, value: int) -> int:
        if value > SCHEMA_VERSION:
            raise ValueError(_newer_schema(value))
        return value


def _newer_schema(value: object) -> str:
    return (
        f"schema_version {value} is newer than this reader's {SCHEMA_VERSION}; "
        "upgrade this side to read it"
    )


class Part(BaseModel):
    """A piece of a message: as strict when written, versioned by the message holding it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


M = TypeVar("M", bound=BaseModel)


def decode(cls: type[M], payload: bytes | str) -> M:
    """Read a received message tolerantly: unknown fields are ignored at every level.

    Raises :class:`UnsupportedSchema` for a newer major ``schema_version`` (whatever else
    is wrong with the message: its shape may be the newer one) and :class:`ProtocolError`
    for any other malformation."""
    try:
        return cls.model_validate_json(payload, extra="ignore")
    except ValidationError as exc:
        errors = exc.errors()
        for error in errors:
            if error["loc"] == ("schema_version",) and error["type"] == "value_error":
                raise UnsupportedSchema(
                    f"{cls.__name__} refused: {_newer_schema(error['input'])}"
                ) from exc
        first = errors[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise ProtocolError(f"bad {cls.__name__}: {where}: {first['msg']}") from exc


class TensorSpec(Part):
    """One input or output of a model; -1 marks a dynamic dimension."""

    name: TensorName
    datatype: Literal[
        "BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES"
    ]
    shape: list[Annotated[int, Field(ge=-1)]]


class ArtifactRef(Part):
    """A content-addressed file and the hash of each of its chunks."""

    sha256: Sha256
    size: int = Field(ge=1)
    chunk_size: int = Field(ge=1024, le=16 * 1024 * 1024)
    chunks: list[Sha256] = Field(min_length=1, max_length=MAX_CHUNKS)

    @classmethod
    def of(cls, data: bytes, chunk_size: int) -> ArtifactRef:
        """The reference for ``data`` cut in ``chunk_size`` pieces."""
        return cls(
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            chunk_size=chunk_size,
            chunks=[
                hashlib.sha256(data[i : i + chunk_size]).hexdigest()
                for i in range(0, len(data), chunk_size)
            ],
        )

    @model_validator(mode="after")
    def _chunk_count_matches(self) -> ArtifactRef:
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(
                f"{len(self.chunks)} chunk hashes for {self.size} bytes in "
                f"chunks of {self.chunk_size} (expected {expected})"
            )
        return self


class RoutingPolicy(StrEnum):
    MAX_PROB = "max_prob"
    MARGIN = "margin"
    ENTROPY = "entropy"
    LEARNED = "learned"
    ALWAYS_EDGE = "always_edge"
    ALWAYS_CLOUD = "always_cloud"


class CloudModelRef(Part):
    """The cloud model that answers a device's hard inputs: a pinned version or the latest."""

    name: Name
    version: Annotated[int, Field(ge=1)] | Literal["latest"] = "latest"


class CurvePoint(Part):
    """One point of a calibration curve: the threshold that offloaded this share of the
    calibration split."""

    offload: float = Field(ge=0.0, le=1.0)
    threshold: float


class LearnedRouter(Part):
    """A logistic model of "the edge is wrong and the cloud right" over the edge's scores
    (sorted probabilities, margin, normalised entropy) and, if named, its embedding.

    Features are standardised with ``mean`` / ``scale``; the confidence the router compares
    with its threshold is ``1 - sigmoid(z @ weights + bias)``. Plain lists: a device runs it
    in numpy."""

    embedding_output: TensorName | None = None
    mean: list[float] = Field(min_length=1, max_length=4096)
    scale: list[float] = Field(min_length=1, max_length=4096)
    weights: list[float] = Field(min_length=1, max_length=4096)
    bias: float

    @model_validator(mode="after")
    def _same_length(self) -> LearnedRouter:
        if not len(self.mean) == len(self.scale) == len(self.weights):
            raise ValueError("mean, scale and weights must have one entry per feature")
        if any(s <= 0 for s in self.scale):
            raise ValueError("scale entries must be positive")
        return self


# A second opinion's weights travel in every desired-state document that deploys it.
MAX_SECOND_OPINION_WEIGHTS = 65_536


class SecondOpinion(Part):
    """A linear softmax classifier of the edge model's raw input, run beside it in numpy: a
    row is confident when both the edge model and this second opinion give the edge's answer
    a high probability, ``p_edge^(1 - alpha) * p_second^alpha``.

    ``weights`` is [D, K] row-major over the flattened input ``input`` (D values a row) and
    the K classes; ``bias`` is [K]. ``knots`` are this confidence at each point of the
    routing spec's curve: a reader maps it piecewise-linearly onto the curve's thresholds,
    so the spec's one threshold and one curve serve this router and its fallback policy."""

    input: TensorName = "input"
    weights: list[float] = Field(min_length=2, max_length=MAX_SECOND_OPINION_WEIGHTS)
    bias: list[float] = Field(min_length=2, max_length=4096)
    alpha: float = Field(ge=0.0, le=1.0)
    knots: list[float] = Field(min_length=2, max_length=1001)

    @model_validator(mode="after")
    def _consistent(self) -> SecondOpinion:
        if len(self.weights) % len(self.bias):
            raise ValueError("weights must hold one row of len(bias) classes per input value")
        if any(b < a for a, b in zip(self.knots, self.knots[1:], strict=False)):
            raise ValueError("knots must not decrease")
        return self


class RoutingSpec(Part):
    """How the edge decides an input is hard; the threshold is calibrated by the pipeline.

    Every field added after the first release has a default that keeps the old behaviour:
    no ``cloud_model`` means the cloud is asked for the edge model's own name, probabilities
    are read from ``probabilities``, no curve means the threshold cannot follow a budget.

    ``second_opinion``, when present, ranks the rows instead of ``policy``, on ``policy``'s
    scale (its knots map it onto ``curve``): a reader that does not know the field routes by
    ``policy`` with the same threshold and curve, at about the same offload share."""

    policy: RoutingPolicy
    threshold: float | None = None
    target: str | None = Field(default=None, max_length=200)
    cloud_model: CloudModelRef | None = None
    probabilities_output: TensorName = "probabilities"
    # Offload share -> threshold on the calibration split, offload increasing.
    curve: list[CurvePoint] = Field(default_factory=list, max_length=1001)
    learned: LearnedRouter | None = None
    second_opinion: SecondOpinion | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RoutingSpec:
        if self.policy is RoutingPolicy.LEARNED and self.learned is None:
            raise ValueError("the learned policy needs its model (learned)")
        offloads = [p.offload for p in self.curve]
        if offloads != sorted(offloads):
            raise ValueError("curve points must be in increasing offload order")
        if self.second_opinion is not None:
            if self.policy in (RoutingPolicy.ALWAYS_EDGE, RoutingPolicy.ALWAYS_CLOUD):
                raise ValueError("a second opinion needs a scored policy to fall back on")
            if len(self.second_opinion.knots) != len(self.curve):
                raise ValueError("a second opinion needs one knot per point of the curve")
        return self


class GoldenExample(Part):
    """An input and the outputs the model must give for it (flattened, row-major)."""

    inputs: dict[TensorName, list[float]]
    outputs: dict[TensorName, list[float]]


class HealthCheckSpec(Part):
    golden: list[GoldenExample] = Field(default_factory=list, max_length=64)
    atol: float = Field(default=1e-3, gt=0)
    max_latency_ms: float = Field(default=1000.0, gt=0)


class Manifest(Message):
    """What a device needs to fetch, verify, check and run one model version."""

    model: Name
    version: int = Field(ge=1)
    precision: Literal["fp32", "fp16", "int8"]
    artifact: ArtifactRef
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)
    routing: RoutingSpec | None = None
    trainable: list[TensorName] = Field(default_factory=list)
    healthcheck: HealthCheckSpec = Field(default_factory=HealthCheckSpec)


class Deployment(Part):
    """One model a device should run, and the rollout that asked for it."""

    rollout_id: int | None = None
    manifest: Manifest


class DesiredState(Message):
    """What one device should run; signed by the cloud and monotonic in ``rev``."""

    device_id: Name
    rev: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    deployments: list[Deployment] = Field(default_factory=list, max_length=64)

    @model_validator(mode="after")
    def _one_per_model(self) -> DesiredState:
        names = [d.manifest.model for d in self.deployments]
        if len(names) != len(set(names)):
            raise ValueError("at most one deployment per model")
        if self.expires_at <= self.issued_at:
            raise ValueError("expires_at must be after issued_at")
        return self


class ReportedState(Message):
    rev_applied: int = Field(ge=0, le=INT32_MAX)
    active: dict[Name, int] = Field(default_factory=dict, max_length=MAX_MODELS)
    agent_version: str = Field(max_length=64)
    capabilities: dict[Key, Annotated[str, Field(max_length=256)] | int | float | bool] = Field(
        default_factory=dict, max_length=MAX_KEYS
    )


class DeploymentState(StrEnum):
    """A deployment's progress. REMOVED, added later (a minor change: no new schema_version),
    says the model left the device because its desired state no longer names it. A cloud from
    before it refuses that one status as malformed (its ingest logs, counts and acks it) and
    loses nothing else: it never waited for such a confirmation."""

    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    HEALTHCHECK = "HEALTHCHECK"
    ACTIVE = "ACTIVE"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    REMOVED = "REMOVED"


class StatusEvent(Message):
    """Deployment progress; ``model`` is None for a whole document that was refused."""

    rev: int = Field(ge=0, le=INT32_MAX)
    rollout_id: int | None = Field(default=None, ge=1, le=INT32_MAX)
    model: Name | None = None
    version: int | None = Field(default=None, ge=1, le=INT32_MAX)
    state: DeploymentState
    reason: str | None = Field(default=None, max_length=2000)
    bytes_done: int = Field(default=0, ge=0, le=INT64_MAX)
    bytes_total: int = Field(default=0, ge=0, le=INT64_MAX)
    at: datetime


class PresenceState(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    STOPPED = "stopped"


class Presence(Message):
    # No timestamp: the Last Will is fixed at connect time, long before it fires.
    state: PresenceState


class Histogram(Part):
    """Counts per bucket; ``bounds`` are upper bounds, the last bucket is +inf."""

    bounds: list[float] = Field(max_length=MAX_BUCKETS)
    counts: list[Annotated[int, Field(ge=0)]] = Field(max_length=MAX_BUCKETS + 1)

    @model_validator(mode="after")
    def _shape(self) -> Histogram:
        if len(self.counts) != len(self.bounds) + 1:
            raise ValueError("counts must have one more entry than bounds")
        if any(b >= a for a, b in zip(self.bounds[1:], self.bounds, strict=False)):
            raise ValueError("bounds must increase")
        return self


class BudgetReport(Part):
    """The cloud budget a device had in force when it closed a telemetry window: the models
    whose threshold followed it, and those that kept their own (no calibration curve)."""

    max_offload: float = Field(ge=0.0, le=1.0)
    reason: str = Field(default="", max_length=200)
    until: datetime
    following: list[Name] = Field(default_factory=list, max_length=MAX_MODELS)
    fixed: list[Name] = Field(default_factory=list, max_length=MAX_MODELS)


class LearningState(Part):
    """Federated learning on the device (issue 11): its sample buffer and its SuperNode."""

    samples: int = Field(ge=0, le=INT64_MAX)
    capacity: int = Field(ge=0, le=INT64_MAX)
    sample_bytes: int = Field(default=0, ge=0, le=INT64_MAX)
    by_source: dict[Key, Annotated[int, Field(ge=0, le=INT64_MAX)]] = Field(
        default_factory=dict, max_length=16
    )
    # off | starting | connected | backoff | stopped | missing
    supernode: Key = "off"
    supernode_restarts: int = Field(default=0, ge=0, le=INT64_MAX)
    supernode_reason: str | None = Field(default=None, max_length=500)


class Telemetry(Message):
    window_s: float = Field(gt=0)
    counts: dict[Key, Annotated[int, Field(ge=0)]] = Field(
        default_factory=dict, max_length=MAX_KEYS
    )
    latency_ms: Histogram | None = None
    active: dict[Name, int] = Field(default_factory=dict, max_length=MAX_MODELS)
    cpu_percent: float | None = Field(default=None, ge=0)
    rss_bytes: int | None = Field(default=None, ge=0)
    at: datetime
    # Added after the first release: None (no budget in force) is what older agents mean.
    budget: BudgetReport | None = None
    # Absent from agents without learning (and from those older than it).
    learning: LearningState | None = None


class ArtifactRequest(Message):
    sha256: Sha256
    chunks: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_CHUNKS)
    # The device's first ask of this download (a device joining, or back after a restart):
    # the cloud's carousel waits for joins to settle before a new pass. Older agents leave
    # it out, and their asks count as repeats.
    first: bool = False
    # Why a device asks again (newer agents; None on a first ask and from older agents, whose
    # repeats the cloud takes as before). True: a pass went past these chunks (later ones
    # arrived), so they were lost on the way. False: it heard nothing for a while, and they
    # may still be queued for it at the broker behind a pass to a thousand devices: the cloud
    # sends again a chunk it sent only a moment ago only on evidence that it was lost.
    passed_over: bool | None = None


class CloudBudget(Message):
    """The cloud's offload budget (``cloud/budget``, QoS 1, retained): while its inference
    service is saturated, a device offloads at most ``max_offload`` of its inputs. The cloud
    renews it while it holds; ``until`` is when a device stops following one that was not
    renewed (a cloud that died with a budget retained must not throttle the fleet forever).
    An empty retained payload clears it."""

    max_offload: float = Field(ge=0.0, le=1.0)
    reason: str = Field(default="", max_length=200)
    until: datetime
    # Newer clouds also say how long to follow it from receipt, on the device's own clock
    # (``until`` means nothing to a device whose clock is off), and when it was issued: a
    # retained budget delivered again on a reconnect is the same one and extends nothing.
    # None (an older cloud): ``until`` alone, on the device's clock.
    ttl_s: float | None = Field(default=None, gt=0, le=86_400)
    issued_at: datetime | None = None

    @field_validator("until", "issued_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        # A time without a zone cannot be compared with the device's clock: read it as UTC.
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


def budget_payload(budget: CloudBudget | None) -> bytes:
    """What the cloud publishes (retained) on ``cloud/budget``: the budget, or the empty
    payload that clears it."""
    return b"" if budget is None else budget.model_dump_json().encode()


def read_budget(payload: bytes) -> CloudBudget | None:
    """A received ``cloud/budget`` payload: None for the empty one (no budget), else the
    budget, read tolerantly (:func:`decode`; ProtocolError / UnsupportedSchema if bad)."""
    if not payload.strip():
        return None
    return decode(CloudBudget, payload)
