"""B3 (threads) — the inference service with two onnxruntime intra-op threads that spin while
waiting for work (onnxruntime's default) vs two that sleep (what the service opens).

    python -m bench b3_spinning [--quick] [--model=NAME ...]

On a machine whose cores the server's event loop, its batcher and (here) the load generator
share, spinning threads take those cores between batches. Both services run side by side
(batched, the service's defaults, two intra-op threads each); HTTP binary, one row per
request, closed loop from another process; the two take turns round by round and the claim
is the paired ratio (median over rounds of sleeping / spinning in the same round).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.b3_inference import TOKEN, Client, _context, _served
from bench.common import write
from bench.inference_models import MODELS, available, register
from bench.inference_stats import median_of, stats
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine, open_engine
from cloud.inference.service import InferenceService
from shared.tensors import datatype_of

CONCURRENCY = {"digits-cloud": 4, "minilm": 8}


def _one(name: str, quick: bool) -> dict[str, Any]:
    model = MODELS[name]
    rounds = 2 if quick else 7
    seconds = model.seconds[1 if quick else 0]
    with tempfile.TemporaryDirectory(prefix="b3s-") as tmp:
        context = _context(Path(tmp), 2, inference_max_batch_size=32)
        register(context, model)

        def opener(spin: bool) -> Any:
            def open_version(info: VersionInfo) -> Engine:
                path = context.artifacts.path(info.sha256)
                return open_engine(path, providers=["CPUExecutionProvider"], threads=2, spin=spin)

            return open_version

        services = {
            "spinning": InferenceService(context, engine=opener(True)),
            "sleeping": InferenceService(context, engine=opener(False)),
        }
        row = model.rows(1)
        job = {
            "model": name,
            "token": TOKEN,
            "grpc": "",
            "inputs": {n: {"data": a.tolist(), "datatype": datatype_of(a)} for n, a in row.items()},
            "transport": "http_binary",
            "mode": "closed",
            "concurrency": CONCURRENCY[name],
            "duration": seconds,
        }
        client = Client()
        runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in services}
        try:
            with (
                _served(services["spinning"], context) as spinning,
                _served(services["sleeping"], context) as sleeping,
            ):
                urls = {"spinning": spinning, "sleeping": sleeping}
                for r in range(rounds):
                    for kind, url in urls.items():
                        runs[kind].append(stats(client.run(**job, url=url)))
                    print(f"{name}: round {r + 1}/{rounds}", flush=True)
        finally:
            client.close()
            for service in services.values():
                service.close()
            context.close()
    paired = [
        b["throughput_per_s"] / a["throughput_per_s"]
        for a, b in zip(runs["spinning"], runs["sleeping"], strict=True)
        if a["throughput_per_s"]
    ]
    return {
        "concurrency": CONCURRENCY[name],
        "seconds": seconds,
        "rounds": rounds,
        "medians": {kind: median_of(r) for kind, r in runs.items()},
        "per_round_req_per_s": {k: [r["throughput_per_s"] for r in v] for k, v in runs.items()},
        "sleeping_vs_spinning": round(statistics.median(paired), 3) if paired else None,
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    wanted = [a.split("=", 1)[1] for a in argv if a.startswith("--model=")] or list(MODELS)
    results: dict[str, Any] = {"threads": 2, "models": {}}
    for name in wanted:
        missing = available(MODELS[name])
        if missing is not None:
            print(f"{name}: skipped ({missing})")
            results["models"][name] = {"skipped": missing}
            continue
        results["models"][name] = _one(name, quick)
        print(name, results["models"][name]["sleeping_vs_spinning"], flush=True)
    print(f"wrote {write('b3_spinning', results)}")
