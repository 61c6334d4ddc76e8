"""B7 — compression: FP32, INT8, pruned (30/50/70 %, magnitude and structured), distilled,
FP16 and combinations, for digits-edge, digits-edge-weak and MiniLM.

    python -m bench b7_compression [--quick] [--no-minilm]
    python -m bench b7_compression --int8-check   # MiniLM FP32 vs INT8 only, batch 1, 2 threads

Every variant is made by the pipeline's own code (cloud/pipeline/compress, quantize). Per
model, all variants take turns round by round in one process (1 and 2 threads, batch 1 and
32), so a noisy neighbour slows them alike; the claims are p50 ratios to FP32 measured
side by side. Quality: accuracy on the 360 held-out digits (APGR against the cloud SVM,
max_prob ranking), or cosine to FP32 on 64 held-out sentences. FP16 is for GPU clouds:
there is no GPU here, so its size and quality are reported and its latency is not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from bench.common import interleaved, summarize, write
from cloud.pipeline.compress.data import CompressData
from cloud.pipeline.compress.fp16 import to_fp16
from cloud.pipeline.compress.measure import apgr
from cloud.pipeline.compress.mlp import Mlp, StudentArch, TrainOptions, train
from cloud.pipeline.compress.prune import PruneMethod
from cloud.pipeline.compress.service import PruneOptions, prune_candidate
from cloud.pipeline.datasets import BUILTIN_DIGITS, builtin
from cloud.pipeline.evaluate import accuracy, cosine_rows, make_session, run_model
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.reference import digits
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from cloud.pipeline.service import ParentVersion
from shared.messages import TensorSpec

HEAD = [HEAD_WEIGHT, HEAD_BIAS]
SPARSITIES = (0.3, 0.5, 0.7)
SEEDS = 4


@dataclass
class Variant:
    name: str
    model: bytes
    timed: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _parent(name: str, model: bytes, task: str, inputs: list[TensorSpec], outputs: list[str],
            trainable: list[str]) -> ParentVersion:  # fmt: skip
    return ParentVersion(name, 1, task, "fp32", model, inputs, outputs, trainable, None)


def _pruned(parent: ParentVersion, data: CompressData, *, quick: bool, int8: bool) -> list[Variant]:
    out = []
    for method in (PruneMethod.MAGNITUDE, PruneMethod.STRUCTURED):
        for sparsity in SPARSITIES[1:2] if quick else SPARSITIES:
            tag = f"{method.value[:3]} {sparsity:.0%}"
            options = PruneOptions(method=method, sparsity=sparsity, fine_tune=True)
            child = prune_candidate(parent, data, options)
            out.append(Variant(f"pruned {tag} + ft", child.data))
            if int8 and (sparsity == 0.5 or method is PruneMethod.STRUCTURED):
                both = prune_candidate(parent, data, replace(options, quantize=True))
                out.append(Variant(f"pruned {tag} + ft + INT8", both.data))
    return out


def _students(x: np.ndarray, y: np.ndarray, teacher: np.ndarray, archs: list[str],
              calibration: dict[str, np.ndarray], test: tuple[np.ndarray, np.ndarray],
              quick: bool) -> list[Variant]:  # fmt: skip
    """Seed 0 of each student is timed; its accuracy over SEEDS seeds is reported beside it,
    since one held-out digit is 0.28 pt and a target within 0.5 pt is two digits wide."""
    out = []
    seeds = range(1 if quick else SEEDS)
    for arch in archs:
        made: dict[str, list[bytes]] = {"fp32": [], "int8": []}
        for seed in seeds:
            start = Mlp.init(
                StudentArch.parse(arch), features=64, classes=10, scale=1 / 16, seed=seed
            )
            options = TrainOptions(
                epochs=60 if quick else 150, temperature=8.0, alpha=0.9, seed=seed
            )
            student = train(start, x, y, teacher=teacher, options=options).to_onnx("student")
            made["fp32"].append(student)
            made["int8"].append(quantize(student, method=QuantMethod.STATIC,
                                         calibration=calibration, trainable=HEAD))  # fmt: skip
        for kind, models in made.items():
            accs = [accuracy(run_model(m, {"input": test[0]}, output="probabilities"), test[1])
                    for m in models]  # fmt: skip
            spread = {"seed_accuracies": [round(a, 6) for a in accs],
                      "mean_accuracy": round(float(np.mean(accs)), 6)}  # fmt: skip
            suffix = " + INT8" if kind == "int8" else ""
            out.append(Variant(f"distilled {arch}{suffix}", models[0], extra=spread))
    return out


Built = tuple[list[Variant], Callable[[bytes], dict[str, Any]], dict[int, dict[str, np.ndarray]]]


def digits_variants(name: str, quick: bool) -> Built:
    splits = digits.digits_splits(0)
    fp32 = digits.build_edge(splits) if name == "digits-edge" else digits.build_weak_edge(splits)
    cloud = digits.build_cloud(splits)
    evaluation = builtin(BUILTIN_DIGITS)
    data = CompressData({"input": splits.x_train}, splits.y_train, evaluation, BUILTIN_DIGITS)
    spec = [TensorSpec(name="input", datatype="FP32", shape=[-1, 64])]
    parent = _parent(name, fp32, "classification", spec, ["probabilities", "embedding"], HEAD)
    calibration = evaluation.quantization_inputs
    variants = [Variant("FP32", fp32)]
    variants.append(Variant("INT8", quantize(fp32, method=QuantMethod.STATIC,
                                             calibration=calibration, trainable=HEAD)))  # fmt: skip
    variants.append(Variant("FP16 (GPU only)", to_fp16(fp32), timed=False))
    variants += _pruned(parent, data, quick=quick, int8=True)
    teacher = run_model(cloud, {"input": splits.x_train}, output="probabilities")
    archs = (["mlp:32,16", "mlp:20,16", "mlp:16,16"] if name == "digits-edge"
             else ["mlp:32,16:pool2", "mlp:16,8:pool2"])  # fmt: skip
    variants += _students(splits.x_train, splits.y_train, teacher, archs, calibration,
                          (splits.x_test, splits.y_test), quick)  # fmt: skip
    test = {"input": splits.x_test}
    cloud_probs = run_model(cloud, test, output="probabilities")

    def quality(model: bytes) -> dict[str, Any]:
        probs = run_model(model, test, output="probabilities")
        return {
            "accuracy": round(accuracy(probs, splits.y_test), 6),
            "apgr": apgr(probs, cloud_probs, splits.y_test),
        }

    feeds = {b: {"input": splits.x_test[:b].copy()} for b in (1, 32)}
    return variants, quality, feeds


def minilm_variants(quick: bool) -> Built:
    from cloud.pipeline.compress.data import compress_data
    from cloud.pipeline.reference import minilm

    fp32 = minilm.export_minilm()
    data = compress_data(upload=None, dataset="builtin:minilm", inputs=[])
    specs = [
        TensorSpec(name=n, datatype="INT64", shape=[-1, -1])
        for n in ("input_ids", "attention_mask")
    ]
    parent = _parent("minilm", fp32, "embedding", specs, [minilm.OUTPUT], [])
    variants = [
        Variant("FP32", fp32),
        Variant("INT8 (unfused)", quantize(fp32, method=QuantMethod.DYNAMIC, fuse=False)),
        Variant("INT8 (fused)", quantize(fp32, method=QuantMethod.DYNAMIC)),
        Variant("FP16 (GPU only)", to_fp16(fp32), timed=False),
    ]
    for method in (PruneMethod.MAGNITUDE, PruneMethod.STRUCTURED):
        for sparsity in SPARSITIES[:1] if quick else SPARSITIES:
            ft = method is PruneMethod.STRUCTURED  # a least-squares refit; none for magnitude
            options = PruneOptions(method=method, sparsity=sparsity, fine_tune=ft)
            child = prune_candidate(parent, data, options)
            tag = f"pruned {method.value[:3]} {sparsity:.0%}" + (" + refit" if ft else "")
            variants.append(Variant(tag, child.data))
            if ft and sparsity <= 0.5:
                both = prune_candidate(parent, data, replace(options, quantize=True))
                variants.append(Variant(f"{tag} + INT8 (fused)", both.data))
    test = data.eval.test_inputs
    reference = run_model(fp32, test, output=minilm.OUTPUT, batch_size=32)

    def quality(model: bytes) -> dict[str, Any]:
        cos = cosine_rows(reference, run_model(model, test, output=minilm.OUTPUT, batch_size=32))
        return {
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
        }

    corpus = minilm.tokenize(minilm.sentences(64, seed=1))
    feeds = {b: {k: v[:b].copy() for k, v in corpus.items()} for b in (1, 32)}
    return variants, quality, feeds


def _time(variants: list[Variant], feeds: dict[int, dict[str, np.ndarray]], quick: bool,
          slow: bool) -> dict[str, dict[str, Any]]:  # fmt: skip
    timings: dict[str, dict[str, Any]] = {v.name: {} for v in variants}
    timed = [v for v in variants if v.timed]
    for threads in (1, 2):
        sessions = {v.name: make_session(v.model, threads=threads) for v in timed}
        for batch, feed in feeds.items():
            calls = (2 if batch > 1 else 10) if slow else (5 if batch > 1 else 20)
            engines = {n: (lambda s=s, f=feed: s.run(None, f)) for n, s in sessions.items()}
            samples = interleaved(engines, rounds=3 if quick else 9, calls=calls, warmup=2)
            base = summarize(samples["FP32"], batch)["p50_ms"]
            for name, values in samples.items():
                stats = summarize(values, batch)
                stats["ratio_to_fp32"] = round(stats["p50_ms"] / base, 4)
                timings[name][f"t{threads}_b{batch}"] = stats
    return timings


def run_model_family(family: str, quick: bool) -> list[dict[str, Any]]:
    started = time.perf_counter()
    if family == "minilm":
        variants, quality, feeds = minilm_variants(quick)
    else:
        variants, quality, feeds = digits_variants(family, quick)
    print(f"{family}: {len(variants)} variants built in {time.perf_counter() - started:.0f} s")
    timings = _time(variants, feeds, quick, slow=family == "minilm")
    fp32_size = len(variants[0].model)
    rows = []
    for v in variants:
        row = {"model": family, "variant": v.name, "size_bytes": len(v.model),
               "size_ratio": round(len(v.model) / fp32_size, 4), **quality(v.model),
               "latency": timings[v.name], **v.extra}  # fmt: skip
        rows.append(row)
        cells = " ".join(f"{k}={t['ratio_to_fp32']:.2f}" for k, t in timings[v.name].items())
        print(f"{family:17s} {v.name:34s} {len(v.model) / 1024:9.1f} KiB "
              f"{row.get('accuracy', row.get('cosine_mean'))} {cells}")  # fmt: skip
    return rows


def int8_check(rounds: int = 30) -> dict[str, Any]:
    """The MiniLM target alone (INT8 >= 2x ORT FP32 at batch 1 on 2 threads, cosine >= 0.99),
    timed longer than the full run can afford: FP32, INT8 unfused and INT8 fused in turns."""
    from cloud.pipeline.reference import minilm

    fp32 = minilm.export_minilm()
    models = {
        "FP32": fp32,
        "INT8 (unfused)": quantize(fp32, method=QuantMethod.DYNAMIC, fuse=False),
        "INT8 (fused)": quantize(fp32, method=QuantMethod.DYNAMIC),
    }
    test = minilm.eval_data().test_inputs
    reference = run_model(fp32, test, output=minilm.OUTPUT, batch_size=32)
    feed = {k: v[:1].copy() for k, v in minilm.tokenize(minilm.sentences(64, seed=1)).items()}
    sessions = {n: make_session(m, threads=2) for n, m in models.items()}
    engines = {n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}
    load = os.getloadavg()
    samples = interleaved(engines, rounds=rounds, calls=20, warmup=5)
    out: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in load]}
    base = summarize(samples["FP32"], 1)["p50_ms"]
    for name, values in samples.items():
        stats = summarize(values, 1)
        cos = cosine_rows(reference, run_model(models[name], test, output=minilm.OUTPUT))
        out[name] = {**stats, "speedup": round(base / stats["p50_ms"], 3),
                     "cosine_mean": round(float(cos.mean()), 5)}  # fmt: skip
        row = out[name]
        print(f"{name:16s} p50 {stats['p50_ms']:8.3f} ms  p99 {stats['p99_ms']:8.3f} ms  "
              f"speedup {row['speedup']:.2f}x  cosine {row['cosine_mean']:.4f}")  # fmt: skip
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print("load average before / after:", out["loadavg_before"], out["loadavg_after"])
    return out


def main(argv: list[str]) -> None:
    if "--int8-check" in argv:
        print("wrote", write("b7_minilm_int8", int8_check()))
        return
    quick = "--quick" in argv
    families = ["digits-edge", "digits-edge-weak"]
    if "--no-minilm" not in argv:
        families.append("minilm")
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for family in families:
        rows += run_model_family(family, quick)
    results = {
        "rows": rows,
        "quick": quick,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    print("load average before / after:", results["loadavg_before"], results["loadavg_after"])
    print("wrote", write("b7_compression", results))
