"""B2 — joint inference: how well each router picks the inputs to send to the cloud.

    python -m bench b2_routing [--quick]

Digits, 10 seeded stratified splits (train 60 / calibration 20 / test 20). Per split the
edge (MLP), weak edge (4x4 pooled MLP) and cloud (RBF SVM) models are built with the
project's reference-model code, the INT8 edge with the pipeline's quantizer, and routing is
calibrated with the pipeline's own ``calibrate`` on the calibration split. Every number is
measured on the test split. Rankers offload the least confident first; the sweep gives
APGR (area under the accuracy-vs-offload curve as a share of the edge→cloud gap) and
CPT(x) (smallest offload reaching edge + x·gap). Operating points (a threshold) give the
offload and the share of the gap recovered there; the calibration miss is how far the test
offload lands from a budget set on the calibration split. Medians over the splits.
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.common import machine, write
from cloud.pipeline.calibrate import SECOND_OPINION, RoutingTarget, calibrate, routing_spec
from cloud.pipeline.evaluate import make_session, run_model
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.reference import digits
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from shared.messages import RoutingPolicy
from shared.routing import confidence, learned_confidence, spec_confidence
from shared.second_opinion import agreement, second_opinion_log_probabilities

Array = npt.NDArray[Any]
SEEDS = 10
SEDNA_DEFAULT = 0.5  # CrossEntropyFilter(threshold_cross_entropy=0.5)
BUDGETS = (0.1, 0.2, 0.3)
GAP_TARGET = 0.8
CPT_LEVELS = (0.5, 0.8, 0.95, 1.0)
RANKERS = ("random", "max_prob", "margin", "entropy", "learned", SECOND_OPINION, "oracle")
POLICIES = ("entropy", "max_prob", "margin", "learned", SECOND_OPINION)


def _joint(order: Array, edge_ok: Array, cloud_ok: Array) -> Array:
    gains = (cloud_ok[order].astype(np.int64) - edge_ok[order].astype(np.int64)).cumsum()
    curve: Array = (edge_ok.sum() + np.concatenate([[0], gains])) / len(order)
    return curve


def _sweep(conf: Array, edge_ok: Array, cloud_ok: Array) -> dict[str, float]:
    """APGR and CPT(x) of offloading the least confident first."""
    curve = _joint(np.argsort(conf, kind="stable"), edge_ok, cloud_ok)
    edge, cloud = float(edge_ok.mean()), float(cloud_ok.mean())
    gap = cloud - edge
    pgr = (curve - edge) / gap
    out = {"apgr": float(np.trapezoid(pgr, dx=1 / (len(curve) - 1)))}
    for x in CPT_LEVELS:
        reached = np.flatnonzero(curve >= edge + x * gap - 1e-12)
        out[f"cpt{round(x * 100)}"] = float(reached[0] / (len(curve) - 1))
    return out


def _point(hard: Array, edge_ok: Array, cloud_ok: Array) -> dict[str, float]:
    edge, cloud = float(edge_ok.mean()), float(cloud_ok.mean())
    joint = float(np.where(hard, cloud_ok, edge_ok).mean())
    pgr = (joint - edge) / (cloud - edge) if cloud > edge else float("nan")
    return {"offload": float(hard.mean()), "pgr": pgr, "acc": joint}


def _outputs(model: bytes, x: Array) -> tuple[Array, Array]:
    session = make_session(model)
    return (
        run_model(session, {"input": x}, output="probabilities"),
        run_model(session, {"input": x}, output="embedding"),
    )


def _scores(found: Any, probs: Array, embedding: Array, x: Array) -> dict[str, Array]:
    """Every router's confidence on new rows, on the scale its calibrated threshold is on."""
    scores = {p: confidence(probs, RoutingPolicy(p)) for p in ("max_prob", "margin", "entropy")}
    if found.learned is not None:
        scores["learned"] = learned_confidence(found.learned.router, probs, embedding)
    if found.second is not None:
        opinion = found.second.opinion([0.0, 1.0])
        log_probs = second_opinion_log_probabilities(opinion, x)
        scores[SECOND_OPINION] = agreement(probs, log_probs, opinion.alpha)
    return scores


def _shipped(found: Any, probs: Array, embedding: Array, x: Array) -> tuple[Array, Array, str]:
    """What a device does with the spec the pipeline ships: the rows it offloads, those an
    agent that does not know the second opinion offloads, and what ranks the rows."""
    name, spec = routing_spec(found)
    assert spec.threshold is not None
    outputs = {"probabilities": probs, "embedding": embedding}
    hard = spec_confidence(spec, outputs, {"input": x}) < spec.threshold
    old_agent = spec_confidence(spec, outputs) < spec.threshold
    return hard, old_agent, str(name)


def _one(
    edge: bytes, int8: bytes, cloud: bytes, s: digits.DigitsSplits, seed: int
) -> dict[str, Any]:
    cal_p, cal_e = _outputs(edge, s.x_calib)
    test_p, test_e = _outputs(edge, s.x_test)
    cloud_cal = run_model(cloud, {"input": s.x_calib}, output="probabilities")
    cloud_test = run_model(cloud, {"input": s.x_test}, output="probabilities")
    edge_ok, cloud_ok = test_p.argmax(1) == s.y_test, cloud_test.argmax(1) == s.y_test
    res: dict[str, Any] = {"edge_acc": float(edge_ok.mean()), "cloud_acc": float(cloud_ok.mean())}
    kw = {"cloud_probs": cloud_cal, "embedding": cal_e, "inputs": s.x_calib, "seed": seed}
    gap_cal = calibrate(cal_p, s.y_calib, target=RoutingTarget("gap", GAP_TARGET), **kw)
    scores = _scores(gap_cal, test_p, test_e, s.x_test)
    scores["random"] = np.random.default_rng(seed).random(len(s.y_test))
    gain = (~edge_ok & cloud_ok).astype(float) - (edge_ok & ~cloud_ok).astype(float)
    scores["oracle"] = -gain  # gains first, losses last
    # A split where the cloud is no better than the edge on the test rows has no gap to
    # recover: it is left out of the gap-relative numbers (and counted).
    has_gap = bool(cloud_ok.mean() > edge_ok.mean())
    res["sweep"] = (
        {name: _sweep(conf, edge_ok, cloud_ok) for name, conf in scores.items()} if has_gap else {}
    )
    points: dict[str, dict[str, float]] = {
        "edge-only": _point(np.zeros_like(edge_ok), edge_ok, cloud_ok),
        "cloud-only": _point(np.ones_like(edge_ok), edge_ok, cloud_ok),
        "sedna CrossEntropyFilter 0.5": _point(
            scores["entropy"] < SEDNA_DEFAULT, edge_ok, cloud_ok
        ),
    }
    for policy in POLICIES:
        if policy in scores:
            hard = scores[policy] < gap_cal.threshold(policy)
            points[f"{policy} @ gap:{GAP_TARGET}"] = _point(hard, edge_ok, cloud_ok)
    hard, old_agent, shipped = _shipped(gap_cal, test_p, test_e, s.x_test)
    res["shipped"] = shipped
    if gap_cal.second is not None:
        alone = second_opinion_log_probabilities(gap_cal.second.opinion([0.0, 1.0]), s.x_test)
        res["second_opinion"] = {
            **gap_cal.report[SECOND_OPINION],
            "test_accuracy_alone": float((alone.argmax(1) == s.y_test).mean()),
        }
    points[f"shipped spec @ gap:{GAP_TARGET}"] = _point(hard, edge_ok, cloud_ok)
    points["same spec, agent without second opinion"] = _point(old_agent, edge_ok, cloud_ok)
    res["points"] = points
    misses: dict[str, dict[str, float]] = defaultdict(dict)
    for budget in BUDGETS:
        found = calibrate(cal_p, s.y_calib, target=RoutingTarget("budget", budget), **kw)
        budget_scores = _scores(found, test_p, test_e, s.x_test)
        for policy, conf in budget_scores.items():
            misses[policy][str(budget)] = float((conf < found.threshold(policy)).mean() - budget)
        hard, _old_agent, _name = _shipped(found, test_p, test_e, s.x_test)
        misses["shipped spec"][str(budget)] = float(hard.mean() - budget)
    res["budget_miss"] = dict(misses)
    # INT8: the same thresholds (calibrated on FP32) applied to the INT8 model's outputs, and
    # the INT8 model's own ranking quality.
    q_p, q_e = _outputs(int8, s.x_test)
    q_ok = q_p.argmax(1) == s.y_test
    res["int8"] = {"edge_acc": float(q_ok.mean())}
    q_gap = bool(cloud_ok.mean() > q_ok.mean())
    q_scores = _scores(gap_cal, q_p, q_e, s.x_test)
    for policy in ("max_prob", "entropy", "learned", SECOND_OPINION):
        if policy in q_scores:
            threshold = gap_cal.threshold(policy)
            res["int8"][policy] = {
                "offload_fp32": float((scores[policy] < threshold).mean()),
                "offload_int8": float((q_scores[policy] < threshold).mean()),
                **(_sweep(q_scores[policy], q_ok, cloud_ok) if q_gap else {}),
            }
    return res


def _median(values: list[float]) -> float:
    kept = [v for v in values if not np.isnan(v)]
    return float(statistics.median(kept)) if kept else float("nan")


def _summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "edge_acc": _median([r["edge_acc"] for r in runs]),
        "cloud_acc": _median([r["cloud_acc"] for r in runs]),
        "int8_edge_acc": _median([r["int8"]["edge_acc"] for r in runs]),
    }
    out["shipped"] = dict(Counter(r["shipped"] for r in runs))
    second = [r["second_opinion"] for r in runs if "second_opinion" in r]
    if second:
        out["second_opinion"] = {
            k: _median([v[k] for v in second])
            for k in ("alpha", "c", "out_of_fold_accuracy", "test_accuracy_alone")
        }
    gapped = [r for r in runs if r["sweep"]]
    out["splits_with_gap"] = len(gapped)
    out["sweep"] = {
        name: {k: _median([r["sweep"][name][k] for r in gapped]) for k in gapped[0]["sweep"][name]}
        for name in RANKERS
        if all(name in r["sweep"] for r in gapped)
    }
    out["points"] = {
        name: {k: _median([r["points"][name][k] for r in runs if name in r["points"]]) for k in v}
        for name, v in runs[0]["points"].items()
    }
    out["budget_miss"] = {}
    for policy, by_budget in runs[0]["budget_miss"].items():
        out["budget_miss"][policy] = {}
        for b in by_budget:
            misses = [abs(r["budget_miss"][policy][b]) for r in runs if policy in r["budget_miss"]]
            out["budget_miss"][policy][b] = {
                "median_abs_pt": 100 * _median(misses),
                "max_abs_pt": 100 * max(misses),
                "splits": len(misses),
            }
    keys = ("offload_fp32", "offload_int8", "apgr", "cpt100")
    out["int8"] = {
        policy: {k: _median([r["int8"][policy].get(k, float("nan")) for r in runs]) for k in keys}
        for policy in runs[0]["int8"]
        if policy != "edge_acc" and all(policy in r["int8"] for r in runs)
    }
    return out


def _print(name: str, summary: dict[str, Any]) -> None:
    print(
        f"\n### {name}: edge {summary['edge_acc']:.4f}, cloud {summary['cloud_acc']:.4f} "
        f"(gap-relative numbers over the {summary['splits_with_gap']} splits with a gap)"
    )
    print(f"shipped by the pipeline at gap:{GAP_TARGET}: {summary['shipped']}")
    if "second_opinion" in summary:
        print(f"second opinion (medians): {summary['second_opinion']}")
    print("| router | APGR | CPT(50) | CPT(80) | CPT(95) | CPT(100) |")
    print("|---|---|---|---|---|---|")
    for ranker, m in summary["sweep"].items():
        cpts = " | ".join(f"{100 * m[f'cpt{x}']:.1f} %" for x in (50, 80, 95, 100))
        print(f"| {ranker} | {m['apgr']:.3f} | {cpts} |")
    print("\n| operating point | offload | gap recovered | accuracy |")
    print("|---|---|---|---|")
    for point, m in summary["points"].items():
        print(f"| {point} | {100 * m['offload']:.1f} % | {m['pgr']:.2f} | {100 * m['acc']:.2f} % |")
    print("\n| policy | " + " | ".join(f"miss @ budget {b}" for b in BUDGETS) + " |")
    print("|---|" + "---|" * len(BUDGETS))
    for policy, by_budget in summary["budget_miss"].items():
        cells = " | ".join(
            f"{m['median_abs_pt']:.1f} (max {m['max_abs_pt']:.1f}) pt" for m in by_budget.values()
        )
        print(f"| {policy} | {cells} |")
    print(f"\nINT8 edge accuracy {summary['int8_edge_acc']:.4f}")
    print("| policy | offload FP32 | offload INT8 (same threshold) | INT8 APGR | INT8 CPT(100) |")
    print("|---|---|---|---|---|")
    for policy, m in summary["int8"].items():
        print(
            f"| {policy} | {100 * m['offload_fp32']:.1f} % | {100 * m['offload_int8']:.1f} % | "
            f"{m['apgr']:.3f} | {100 * m['cpt100']:.1f} % |"
        )


def main(argv: list[str]) -> None:
    seeds = 2 if "--quick" in argv else SEEDS
    runs: dict[str, list[dict[str, Any]]] = {"edge": [], "weak": []}
    for seed in range(seeds):
        s = digits.digits_splits(seed)
        cloud = digits.build_cloud(s)
        ranges = {"input": np.concatenate([s.x_train, s.x_calib])}
        for name, build in (("edge", digits.build_edge), ("weak", digits.build_weak_edge)):
            fp32 = build(s, seed)
            int8 = quantize(
                fp32,
                method=QuantMethod.STATIC,
                calibration=ranges,
                trainable=[HEAD_WEIGHT, HEAD_BIAS],
            )
            runs[name].append(_one(fp32, int8, cloud, s, seed))
        print(f"split {seed} done", file=sys.stderr, flush=True)
    summaries = {name: _summarize(r) for name, r in runs.items()}
    for name, summary in summaries.items():
        _print({"edge": "digits-edge (MLP)", "weak": "digits-edge-weak (4x4)"}[name], summary)
    path = write("b2_routing", {"seeds": seeds, "medians": summaries, "splits": runs})
    print(f"\nwrote {path} ({machine()['cpu']})")
