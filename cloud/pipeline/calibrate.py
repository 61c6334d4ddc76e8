"""Routing calibration: per policy, the threshold that meets a target on a calibration split,
and the curve (offload share -> threshold) a device follows when the cloud sets a budget.

Targets: ``budget`` — offload at most this share of inputs; ``gap`` — recover this share
of the edge→cloud accuracy gap with the least offload (needs the cloud model's answers).
The learned router is one more policy when the split has enough to learn from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud.pipeline.learned_router import TrainedRouter, train_learned_router
from shared.errors import InvalidInput
from shared.messages import CurvePoint, RoutingPolicy
from shared.routing import confidence

__all__ = [
    "CALIBRATED_POLICIES",
    "CURVE_POINTS",
    "Calibration",
    "RoutingTarget",
    "calibrate",
    "offload_curve",
    "threshold_for_share",
]

Array = npt.NDArray[Any]
CALIBRATED_POLICIES = (RoutingPolicy.MAX_PROB, RoutingPolicy.MARGIN, RoutingPolicy.ENTROPY)
CURVE_POINTS = 21


@dataclass(frozen=True, slots=True)
class RoutingTarget:
    kind: Literal["budget", "gap"]
    value: float

    def __post_init__(self) -> None:
        if not 0.0 < self.value <= 1.0:
            raise InvalidInput(f"routing target {self.kind} must be in (0, 1], got {self.value}")

    @classmethod
    def parse(cls, text: str) -> RoutingTarget:
        """``budget:0.2`` or ``gap:0.8``."""
        kind, _, value = text.partition(":")
        if kind not in ("budget", "gap"):
            raise InvalidInput(f"routing target {text!r} must be budget:<share> or gap:<share>")
        try:
            return cls(kind, float(value))  # type: ignore[arg-type]
        except ValueError as exc:
            raise InvalidInput(f"routing target {text!r}: {value!r} is not a number") from exc

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True, slots=True)
class Calibration:
    """What :func:`calibrate` found: the report kept in the registry, and the parts a
    routing spec is built from."""

    report: dict[str, Any]
    curves: dict[str, list[CurvePoint]]
    learned: TrainedRouter | None

    @property
    def chosen(self) -> str:
        return str(self.report["chosen"])

    def threshold(self, policy: str) -> float:
        return float(self.report["policies"][policy]["threshold"])


def _threshold_for(conf_sorted: Array, k: int) -> float:
    """A threshold below which exactly the ``k`` least confident inputs fall (ties aside)."""
    if k <= 0:
        return float(conf_sorted[0])  # nothing is strictly below the minimum
    if k >= len(conf_sorted):
        return float(np.nextafter(conf_sorted[-1], np.inf))
    return float((conf_sorted[k - 1] + conf_sorted[k]) / 2)


def threshold_for_share(conf: Array, share: float) -> float:
    """The threshold that offloads ``share`` of the rows whose confidences are ``conf``
    (rounded down to whole rows)."""
    ordered = np.sort(np.asarray(conf, dtype=np.float64), kind="stable")
    return _threshold_for(ordered, int(np.floor(share * len(ordered) + 1e-9)))


def offload_curve(conf: Array, points: int = CURVE_POINTS) -> list[CurvePoint]:
    """Offload share -> threshold at ``points`` evenly spaced shares from 0 to 1."""
    ordered = np.sort(np.asarray(conf, dtype=np.float64), kind="stable")
    n = len(ordered)
    curve = []
    for share in np.linspace(0.0, 1.0, points):
        threshold = _threshold_for(ordered, int(np.floor(share * n + 1e-9)))
        curve.append(CurvePoint(offload=float(share), threshold=threshold))
    return curve


def _joint_curve(order: Array, edge_ok: Array, cloud_ok: Array) -> Array:
    """Joint accuracy when the k least confident go to the cloud, for k = 0..n."""
    gains = (cloud_ok[order].astype(np.int64) - edge_ok[order].astype(np.int64)).cumsum()
    correct: Array = edge_ok.sum() + np.concatenate([[0], gains])
    return correct / len(order)


def calibrate(
    edge_probs: Array,
    labels: Array,
    *,
    target: RoutingTarget,
    cloud_probs: Array | None = None,
    embedding: Array | None = None,
    embedding_output: str = "embedding",
    learned: bool = True,
    seed: int = 0,
) -> Calibration:
    """Thresholds and curves for each policy, and the policy that meets the target with the
    least offload (the most accurate one at equal offload)."""
    n = len(labels)
    if n == 0 or len(edge_probs) != n:
        raise InvalidInput(
            "calibration needs probabilities and labels of the same, non-zero length"
        )
    if target.kind == "gap" and cloud_probs is None:
        raise InvalidInput("a gap target needs the cloud model's answers on the calibration split")
    edge_ok = edge_probs.argmax(axis=1) == labels
    cloud_ok = cloud_probs.argmax(axis=1) == labels if cloud_probs is not None else None
    edge_acc = float(edge_ok.mean())
    cloud_acc = float(cloud_ok.mean()) if cloud_ok is not None else None
    scores = {p.value: confidence(edge_probs, p) for p in CALIBRATED_POLICIES}
    trained = None
    if learned:
        trained = train_learned_router(
            edge_probs,
            labels,
            cloud_probs=cloud_probs,
            embedding=embedding,
            embedding_output=embedding_output,
            seed=seed,
        )
        if trained is not None:
            scores[RoutingPolicy.LEARNED.value] = trained.calibration_confidence
    policies: dict[str, dict[str, float]] = {}
    curves: dict[str, list[CurvePoint]] = {}
    for policy, conf in scores.items():
        order = np.argsort(conf, kind="stable")
        if target.kind == "budget":
            k = int(np.floor(target.value * n + 1e-9))
        else:
            assert cloud_ok is not None
            assert cloud_acc is not None
            joint = _joint_curve(order, edge_ok, cloud_ok)
            goal = edge_acc + target.value * max(cloud_acc - edge_acc, 0.0)
            k = int(np.argmax(joint >= goal - 1e-12))
        threshold = _threshold_for(conf[order], k)
        offloaded = conf < threshold
        entry = {"threshold": threshold, "offload": float(offloaded.mean())}
        if cloud_ok is not None:
            entry["accuracy"] = float(np.where(offloaded, cloud_ok, edge_ok).mean())
        policies[policy] = entry
        curves[policy] = offload_curve(conf)
    best = min(policies, key=lambda p: (policies[p]["offload"], -policies[p].get("accuracy", 0)))
    report: dict[str, Any] = {
        "target": str(target),
        "examples": n,
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "policies": policies,
        "chosen": best,
    }
    if trained is not None:
        report["learned"] = {
            "c": trained.c,
            "uses_embedding": trained.uses_embedding,
            "out_of_fold_area": trained.out_of_fold_area,
        }
    return Calibration(report, curves, trained)
