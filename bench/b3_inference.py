"""B3 — cloud fallback service: engine ceiling vs in-process batcher vs HTTP binary vs HTTP
JSON vs gRPC (from a separate process), closed-loop sweep and open-loop Poisson arrivals.

    python -m bench b3_inference [--quick] [--delay-ms=N]

The digits-cloud reference model (RBF SVM as ONNX), one row per request as an agent sends
its hard inputs. One process serves two inference services side by side on the same
registry: batched (max batch 32, queue delay N ms, default 0) and unbatched (max batch 1);
each session
uses one onnxruntime thread. The load comes from `bench/inference_client.py` in another
process. Layers: bare `session.run` at batch 1/8/32/128 (the engine ceiling, rows/s); the
batcher called in-process; HTTP binary, HTTP JSON and gRPC end to end. Closed-loop
concurrency sweep for capacity, then open-loop Poisson arrivals at 20-100 % of the batched
HTTP binary capacity against both services for p50/p99 (closed loops hide queueing).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn

from bench.common import interleaved, percentile, summarize, write
from bench.inference_client import closed_loop
from cloud.api.server import JsonH11Protocol
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.embedded.services import ServiceUrls
from cloud.inference.app import create_inference_app
from cloud.inference.engine import open_engine
from cloud.inference.grpc_server import GrpcServer
from cloud.inference.service import InferenceService
from cloud.pipeline.reference import digits
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.settings import CloudSettings
from shared.tensors import InferRequest

TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
MODEL = "digits-cloud"
ROOT = Path(__file__).resolve().parents[1]


def _context(data_dir: Path, **settings: Any) -> CloudContext:
    config = CloudSettings(
        data_dir=data_dir,
        admin_token=TOKEN,
        inference_threads=1,
        inference_providers=["CPUExecutionProvider"],
        inference_max_queue=4096,
        **settings,
    )
    # Redis is never used here (no rate limit, no result cache): a URL nobody answers.
    urls = ServiceUrls(config.resolved_database_url, "mqtt://127.0.0.1:1", "redis://127.0.0.1:1")
    return CloudContext.open(config, urls)


@contextmanager
def _served(service: InferenceService, context: CloudContext) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_inference_app(context, service),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            http=JsonH11Protocol,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Client:
    """The load generator process: one JSON job in, one JSON result out."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.inference_client"],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, **job: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        result: dict[str, Any] = json.loads(self.process.stdout.readline())
        return result

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def _stats(result: dict[str, Any]) -> dict[str, float]:
    latencies = result["latencies"] or [float("nan")]
    done = len(result["latencies"])
    return {
        "throughput_per_s": round(done / result["seconds"], 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(percentile(latencies, 99) * 1000, 3),
        "error_rate": round(result["errors"] / max(1, done), 4),
        "requests": done,
    }


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def _engine_ceiling(context: CloudContext, sha256: str, x: np.ndarray, quick: bool) -> list[Any]:
    engine = open_engine(
        context.artifacts.path(sha256), providers=["CPUExecutionProvider"], threads=1
    )
    sizes = (1, 8, 32, 128)
    calls: dict[str, Callable[[], object]] = {
        str(b): (lambda b=b: engine.run({"input": x[:b]})) for b in sizes
    }
    samples = interleaved(calls, rounds=3 if quick else 10, calls=5 if quick else 20)
    return [{"batch": b, **summarize(samples[str(b)], b)} for b in sizes]


def _in_process(
    service: InferenceService, row: np.ndarray, concurrency: int, seconds: float
) -> dict[str, float]:
    info = service.catalog.resolve(MODEL, None)

    def make() -> Callable[[], bool]:
        def call() -> bool:
            service.infer(info, lambda: InferRequest(inputs={"input": row}))
            return True

        return call

    return _stats(closed_loop(make, concurrency, seconds))


def _batch_histogram(service: InferenceService) -> dict[str, float]:
    registry = service.metrics.registry
    labels = {"model": MODEL, "version": "1"}
    out: dict[str, float] = {}
    for bound in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0"):
        value = registry.get_sample_value("nv_inference_batch_size_bucket", {**labels, "le": bound})
        out[f"le_{bound.removesuffix('.0')}"] = value or 0.0
    count = registry.get_sample_value("nv_inference_batch_size_count", labels) or 1.0
    out["mean"] = round(
        (registry.get_sample_value("nv_inference_batch_size_sum", labels) or 0) / count, 2
    )
    return out


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    delay_ms = next((float(a.split("=", 1)[1]) for a in argv if a.startswith("--delay-ms=")), 0.0)
    repeats, seconds = (1, 1.5) if quick else (3, 3.0)
    sweep = (1, 16) if quick else (1, 4, 16, 32)
    splits = digits.digits_splits(0)
    x = np.ascontiguousarray(splits.x_test[:128], dtype=np.float32)
    row = x[:1]
    with tempfile.TemporaryDirectory(prefix="b3-") as tmp:
        data_dir = Path(tmp)
        batched_ctx = _context(
            data_dir, inference_max_batch_size=32, inference_max_queue_delay_ms=delay_ms
        )
        unbatched_ctx = dataclasses.replace(
            batched_ctx,
            settings=batched_ctx.settings.model_copy(update={"inference_max_batch_size": 1}),
        )
        data = digits.build_cloud(splits)
        with batched_ctx.database.session() as session:
            repository.create_model(session, name=MODEL)
            sha256 = register_version(
                session,
                batched_ctx.artifacts,
                model_name=MODEL,
                blocks=[data],
                max_bytes=len(data) + 1,
                precision="fp32",
                actor="bench",
            ).artifact_sha256
        results: dict[str, Any] = {"model": MODEL, "rows_per_request": 1, "delay_ms": delay_ms}
        print("engine ceiling ...", flush=True)
        results["engine"] = _engine_ceiling(batched_ctx, sha256, x, quick)
        batched, unbatched = InferenceService(batched_ctx), InferenceService(unbatched_ctx)
        grpc = GrpcServer(batched, host="127.0.0.1", port=0)
        grpc_port = grpc.start()
        client = Client()
        try:
            with _served(batched, batched_ctx) as url_b, _served(unbatched, unbatched_ctx) as url_u:
                print("in-process batcher ...", flush=True)
                results["in_process"] = {
                    name: {
                        c: _median_of([_in_process(s, row, c, seconds) for _ in range(repeats)])
                        for c in sweep
                    }
                    for name, s in (("batched", batched), ("unbatched", unbatched))
                }
                common = {
                    "model": MODEL,
                    "token": TOKEN,
                    "rows": row.tolist(),
                    "grpc": f"127.0.0.1:{grpc_port}",
                }

                def measure(**job: Any) -> dict[str, float]:
                    return _median_of([_stats(client.run(**common, **job)) for _ in range(repeats)])

                closed: dict[str, dict[int, dict[str, float]]] = {}
                for name, transport, url in (
                    ("http_binary", "http_binary", url_b),
                    ("http_json", "http_json", url_b),
                    ("grpc", "grpc", url_b),
                    ("http_binary_unbatched", "http_binary", url_u),
                ):
                    print(f"closed loop {name} ...", flush=True)
                    closed[name] = {
                        c: measure(
                            url=url,
                            transport=transport,
                            mode="closed",
                            concurrency=c,
                            duration=seconds,
                        )
                        for c in sweep
                    }
                results["closed_loop"] = closed
                capacity = max(p["throughput_per_s"] for p in closed["http_binary"].values())
                results["capacity_http_binary_per_s"] = capacity
                opened: dict[str, dict[str, dict[str, float]]] = {"batched": {}, "unbatched": {}}
                for share in (0.2, 0.5, 0.8, 1.0):
                    for name, url in (("batched", url_b), ("unbatched", url_u)):
                        print(f"open loop {name} at {share:.0%} ...", flush=True)
                        opened[name][f"{share:.0%}"] = measure(
                            url=url,
                            transport="http_binary",
                            mode="open",
                            rate=capacity * share,
                            duration=seconds,
                        )
                results["open_loop"] = opened
                results["batch_size_histogram_batched"] = _batch_histogram(batched)
        finally:
            client.close()
            grpc.stop(0)
            batched.close()
            unbatched.close()
            batched_ctx.close()
    results["ratios"] = _ratios(results)
    path = write("b3_inference", results)
    print(json.dumps(results["ratios"], indent=2))
    print(f"wrote {path}")


def _ratios(r: dict[str, Any]) -> dict[str, float]:
    best_engine = max(e["throughput_per_s"] for e in r["engine"])
    closed = r["closed_loop"]

    def cap(name: str) -> float:
        return float(max(p["throughput_per_s"] for p in closed[name].values()))

    binary = cap("http_binary")
    return {
        "http_binary_vs_engine_best": round(binary / best_engine, 3),
        "http_binary_vs_engine_batch1": round(binary / r["engine"][0]["throughput_per_s"], 3),
        "batched_vs_unbatched_http_binary": round(binary / cap("http_binary_unbatched"), 3),
        "http_binary_vs_http_json": round(binary / cap("http_json"), 3),
        "grpc_vs_http_binary": round(cap("grpc") / binary, 3),
    }
