"""Routing calibration: per policy, the threshold that meets a target on a calibration split,
and the curve (offload share -> threshold) a device follows when the cloud sets a budget.

Targets: ``budget`` — offload at most this share of inputs; ``gap`` — recover this share
of the edge→cloud accuracy gap with the least offload (needs the cloud model's answers).
The learned router is one more policy when the split has enough to learn from, and so is
the second opinion (a classifier of the raw input) when the model's input is given: it ships
on the scale of the best plain policy, its fallback for readers that do not know it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud.pipeline.learned_router import TrainedRouter, train_learned_router
from cloud.pipeline.second_opinion import TrainedSecondOpinion, train_second_opinion
from shared.errors import InvalidInput
from shared.messages import CloudModelRef, CurvePoint, RoutingPolicy, RoutingSpec
from shared.routing import confidence
from shared.second_opinion import on_curve

__all__ = [
    "CALIBRATED_POLICIES",
    "CURVE_POINTS",
    "SECOND_OPINION",
    "Calibration",
    "RoutingTarget",
    "calibrate",
    "offload_curve",
    "routing_spec",
    "threshold_for_share",
]

Array = npt.NDArray[Any]
CALIBRATED_POLICIES = (RoutingPolicy.MAX_PROB, RoutingPolicy.MARGIN, RoutingPolicy.ENTROPY)
CURVE_POINTS = 21
# Not a RoutingPolicy: an agent that does not know it must still read the spec (it ships
# beside a plain policy, see RoutingSpec.second_opinion).
SECOND_OPINION = "second_opinion"


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
    second: TrainedSecondOpinion | None = None

    @property
    def chosen(self) -> str:
        return str(self.report["chosen"])

    @property
    def fallback(self) -> str:
        """The best plain policy: what ships beside a second opinion, on whose scale."""
        return str(self.report["fallback"])

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
    inputs: Array | None = None,
    input_name: str = "input",
    second_opinion: bool = True,
    seed: int = 0,
) -> Calibration:
    """Thresholds and curves for each policy, and the policy that meets the target with the
    least offload (the most accurate one at equal offload). ``inputs`` (the model's input on
    the calibration rows) lets the second opinion compete."""
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
    second = None
    if second_opinion and inputs is not None:
        second = train_second_opinion(
            edge_probs, labels, inputs, cloud_probs=cloud_probs, input_name=input_name, seed=seed
        )
        if second is not None:
            scores[SECOND_OPINION] = second.calibration_confidence
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

    def rank(p: str) -> tuple[float, float]:
        return policies[p]["offload"], -policies[p].get("accuracy", 0)

    report: dict[str, Any] = {
        "target": str(target),
        "examples": n,
        "edge_accuracy": edge_acc,
        "cloud_accuracy": cloud_acc,
        "policies": policies,
        "chosen": min(policies, key=rank),
        "fallback": min((p for p in policies if p != SECOND_OPINION), key=rank),
    }
    if trained is not None:
        report["learned"] = {
            "c": trained.c,
            "uses_embedding": trained.uses_embedding,
            "out_of_fold_area": trained.out_of_fold_area,
        }
    if second is not None:
        report[SECOND_OPINION] = {
            "c": second.c,
            "alpha": second.alpha,
            "out_of_fold_area": second.out_of_fold_area,
            "out_of_fold_accuracy": second.out_of_fold_accuracy,
        }
    return Calibration(report, curves, trained, second)


def routing_spec(
    found: Calibration,
    *,
    policy: RoutingPolicy | None = None,
    target: str | None = None,
    cloud_model: CloudModelRef | None = None,
    probabilities_output: str = "probabilities",
    second_opinion_beside: bool = False,
) -> tuple[str | None, RoutingSpec]:
    """The spec a device gets and the name of what ranks its rows (None: nothing was
    calibrated for ``policy``): ``policy`` if given, else the calibration's choice. A chosen
    second opinion ships beside the best plain policy, its threshold moved onto that
    policy's scale, so an agent that does not know it routes by the plain policy at about
    the same offload share. ``second_opinion_beside`` ships one (when one was calibrated)
    beside ``policy`` itself: a new version routed as one that had it."""
    common: dict[str, Any] = {
        "target": target,
        "cloud_model": cloud_model,
        "probabilities_output": probabilities_output,
    }
    name = policy.value if policy is not None else found.chosen
    if name not in found.report["policies"]:
        if policy is RoutingPolicy.LEARNED:
            raise InvalidInput(
                "the learned router could not be trained: the calibration split has too few "
                "inputs that the edge gets wrong and the cloud right"
            )
        assert policy is not None  # the calibration's own choice was calibrated
        return None, RoutingSpec(policy=policy, **common)
    plain = found.fallback if name == SECOND_OPINION else name
    if second_opinion_beside and found.second is not None and plain in found.curves:
        name = SECOND_OPINION
    threshold = found.threshold(plain)
    opinion = None
    if name == SECOND_OPINION:
        assert found.second is not None
        knots = [p.threshold for p in found.curves[SECOND_OPINION]]
        opinion = found.second.opinion(knots)
        raw = np.array([found.threshold(SECOND_OPINION)])
        threshold = float(on_curve(raw, knots, found.curves[plain])[0])
    learned = found.learned.router if found.learned is not None else None
    return name, RoutingSpec(
        policy=RoutingPolicy(plain),
        threshold=threshold,
        curve=found.curves[plain],
        learned=learned if plain == RoutingPolicy.LEARNED.value else None,
        second_opinion=opinion,
        **common,
    )
