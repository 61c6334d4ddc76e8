"""B1 — edge runtime: PyTorch eager FP32 vs ORT FP32 vs ORT INT8, MiniLM and digits.

    python -m bench b1_edge [--quick]

Same model, same inputs, same thread count (1 and 2), batch 1 and 32; engines take turns
round by round. Reports p50/p99, throughput, size, load time, accuracy (digits) or cosine
to FP32 (MiniLM), and the ratios INT8/FP32 and INT8/PyTorch.
"""

from __future__ import annotations

import os
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx
from onnx import numpy_helper

from bench.common import interleaved, summarize, write
from cloud.pipeline.evaluate import accuracy, cosine_rows, make_session, run_model
from cloud.pipeline.quantize import QuantMethod, quantize
from cloud.pipeline.reference import digits
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT


def _digits_torch(model: bytes) -> Any:
    """The digits edge MLP as a PyTorch module with the ONNX graph's own weights."""
    import torch

    weights = {
        i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(model).graph.initializer
    }
    layers: list[Any] = []
    i = 0
    while f"layer{i}.weight" in weights:
        linear = torch.nn.Linear(*weights[f"layer{i}.weight"].shape)
        linear.weight.data = torch.from_numpy(weights[f"layer{i}.weight"].T.copy())
        linear.bias.data = torch.from_numpy(weights[f"layer{i}.bias"].copy())
        layers += [linear, torch.nn.ReLU()]
        i += 1
    head = torch.nn.Linear(*weights[HEAD_WEIGHT].shape)
    head.weight.data = torch.from_numpy(weights[HEAD_WEIGHT].T.copy())
    head.bias.data = torch.from_numpy(weights[HEAD_BIAS].copy())

    class Edge(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*layers)
            self.head = head

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.head(self.body(x / 16.0)), dim=-1)

    return Edge().eval()


def _timed_load(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _run_case(
    name: str,
    fp32: bytes,
    int8: bytes,
    torch_module: Any,
    feeds: dict[int, dict[str, np.ndarray]],
    output: str,
    quick: bool,
) -> list[dict[str, Any]]:
    import torch

    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        fp32_session, fp32_load = _timed_load(lambda: make_session(fp32, threads=threads))  # noqa: B023
        int8_session, int8_load = _timed_load(lambda: make_session(int8, threads=threads))  # noqa: B023
        for batch, feed in feeds.items():
            tensors = [torch.from_numpy(v) for v in feed.values()]

            def eager(tensors: list[Any] = tensors) -> object:
                with torch.inference_mode():
                    return torch_module(*tensors)

            engines = {
                "pytorch_eager_fp32": eager,
                "ort_fp32": lambda s=fp32_session, f=feed: s.run([output], f),
                "ort_int8": lambda s=int8_session, f=feed: s.run([output], f),
            }
            calls = 5 if batch > 1 else 20
            samples = interleaved(engines, rounds=3 if quick else 15, calls=calls)
            result = {e: summarize(v, batch) for e, v in samples.items()}
            p50 = {e: r["p50_ms"] for e, r in result.items()}
            row = {
                "model": name,
                "threads": threads,
                "batch": batch,
                "engines": result,
                "int8_vs_fp32": round(p50["ort_fp32"] / p50["ort_int8"], 3),
                "int8_vs_pytorch": round(p50["pytorch_eager_fp32"] / p50["ort_int8"], 3),
                "load_s": {"ort_fp32": round(fp32_load, 4), "ort_int8": round(int8_load, 4)},
            }
            rows.append(row)
            print(
                f"{name:12s} t={threads} b={batch:2d}  torch {p50['pytorch_eager_fp32']:8.3f} ms"
                f"  fp32 {p50['ort_fp32']:8.3f} ms  int8 {p50['ort_int8']:8.3f} ms"
                f"  int8/fp32 {row['int8_vs_fp32']:.2f}x  int8/torch {row['int8_vs_pytorch']:.2f}x"
            )
    return rows


def bench_digits(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    splits = digits.digits_splits(0)
    fp32 = digits.build_edge(splits)
    int8 = quantize(
        fp32,
        method=QuantMethod.STATIC,
        calibration={"input": np.concatenate([splits.x_train, splits.x_calib])},
        trainable=[HEAD_WEIGHT, HEAD_BIAS],
    )
    module = _digits_torch(fp32)
    test = {"input": splits.x_test}
    quality = {
        "size_bytes": {"fp32": len(fp32), "int8": len(int8)},
        "accuracy": {
            "ort_fp32": accuracy(run_model(fp32, test, output="probabilities"), splits.y_test),
            "ort_int8": accuracy(run_model(int8, test, output="probabilities"), splits.y_test),
        },
    }
    feeds = {b: {"input": splits.x_test[:b].copy()} for b in (1, 32)}
    return _run_case("digits-edge", fp32, int8, module, feeds, "probabilities", quick), quality


def bench_minilm(quick: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from cloud.pipeline.reference import minilm

    fp32 = minilm.export_minilm()
    int8 = quantize(fp32, method=QuantMethod.DYNAMIC)
    module = minilm.load_torch_model()
    corpus = minilm.tokenize(minilm.sentences(64, seed=1))
    a = run_model(fp32, corpus, output=minilm.OUTPUT, batch_size=32)
    b = run_model(int8, corpus, output=minilm.OUTPUT, batch_size=32)
    cos = cosine_rows(a, b)
    quality = {
        "size_bytes": {"fp32": len(fp32), "int8": len(int8)},
        "cosine_int8_to_fp32": {
            "mean": float(cos.mean()),
            "min": float(cos.min()),
            "sentences": 64,
        },
    }
    feeds = {bs: {k: v[:bs].copy() for k, v in corpus.items()} for bs in (1, 32)}
    return _run_case("minilm", fp32, int8, module, feeds, minilm.OUTPUT, quick), quality


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    results: dict[str, Any] = {"rows": [], "quality": {}}
    for name, fn in (("digits-edge", bench_digits), ("minilm", bench_minilm)):
        rows, quality = fn(quick)
        results["rows"] += rows
        results["quality"][name] = quality
        print(name, quality)
    print("wrote", write("b1_edge", results))
