"""Routing calibration: per policy, the threshold that meets a target on a calibration split.

Targets: ``budget`` — offload at most this share of inputs; ``gap`` — recover this share
of the edge→cloud accuracy gap with the least offload (needs the cloud model's answers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from shared.errors import InvalidInput
from shared.messages import RoutingPolicy
from shared.routing import confidence

__all__ = ["CALIBRATED_POLICIES", "RoutingTarget", "calibrate"]

Array = npt.NDArray[Any]
CALIBRATED_POLICIES = (RoutingPolicy.MAX_PROB, RoutingPolicy.MARGIN, RoutingPolicy.ENTROPY)


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


def _threshold_for(conf_sorted: Array, k: int) -> float:
    """A threshold below which exactly the ``k`` least confident inputs fall (ties aside)."""
    if k <= 0:
        return float(conf_sorted[0])  # nothing is strictly below the minimum
    if k >= len(conf_sorted):
        return float(np.nextafter(conf_sorted[-1], np.inf))
    return float((conf_sorted[k - 1] + conf_sorted[k]) / 2)


def _curve(order: Array, edge_ok: Array, cloud_ok: Array) -> Array:
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
) -> dict[str, Any]:
    """Thresholds for each policy, and the policy that meets the target with least offload."""
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
    policies: dict[str, dict[str, float]] = {}
    for policy in CALIBRATED_POLICIES:
        conf = confidence(edge_probs, policy)
        order = np.argsort(conf, kind="stable")
        conf_sorted = conf[order]
        if target.kind == "budget":
            k = int(np.floor(target.value * n + 1e-9))
        else:
            assert cloud_ok is not None
            assert cloud_acc is not None
            curve = _curve(order, edge_ok, cloud_ok)
            goal = edge_acc + target.value * max(cloud_acc - edge_acc, 0.0)
            k = int(np.argmax(curve >= goal - 1e-12))
        threshold = _threshold_for(conf_sorted, k)
        offloaded = conf < threshold
        entry = {"threshold": threshold, "offload": float(offloaded.mean())}
        if cloud_ok is not None:
            entry["accuracy"] = float(np.where(offloaded, cloud_ok, edge_ok).mean())
        policies[policy.value] = entry
    best = min(policies, key=lambda p: (policies[p]["offload"], -policies[p].get("accuracy", 0)))
    return {
        "target": str(target),
        "examples": n,
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "policies": policies,
        "chosen": best,
    }
