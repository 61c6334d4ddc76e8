"""B3 — cloud fallback service: engine ceiling vs in-process batcher vs HTTP binary vs HTTP
JSON vs gRPC (from a separate process), closed-loop sweep and open-loop Poisson arrivals.

    python -m bench b3_inference [--quick] [--delay-ms=N] [--threads=N] [--model=NAME ...]

Each cloud model of `bench/inference_models.py` (digits-cloud; MiniLM FP32 when the `models`
extra is installed), one row per request as an agent sends its hard inputs. One process
serves two inference services side by side on the same registry: batched (max batch 32,
queue delay N ms, default 0) and unbatched (max batch 1); each session uses N onnxruntime
threads (default 1: the other core serves HTTP and runs the load). The load comes from
`bench/inference_client.py` in another process. Layers: bare `session.run` at each batch
size (the engine ceiling, rows/s); the batcher called in-process; HTTP binary, HTTP JSON and
gRPC end to end. Closed-loop concurrency sweep for capacity, then open-loop Poisson arrivals
at 20-100 % of the batched HTTP binary capacity against both services for p50/p99 (closed
loops hide queueing). Configurations take turns round by round (median of the rounds), so a
noisy neighbour slows them alike.
"""

from __future__ import annotations

import dataclasses
import json
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

from bench.common import write
from bench.engine_timing import engine_ceiling, engine_threads
from bench.inference_client import closed_loop
from bench.inference_models import MODELS, BenchModel, available, register
from bench.inference_stats import median_of, ratios, stats
from cloud.api.server import JsonH11Protocol
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.embedded.services import ServiceUrls
from cloud.inference.app import create_inference_app
from cloud.inference.engine import Engine, open_engine
from cloud.inference.grpc_server import GrpcServer
from cloud.inference.service import InferenceService
from cloud.settings import CloudSettings
from shared.tensors import InferRequest, datatype_of

TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
ROOT = Path(__file__).resolve().parents[1]
SHARES = (0.2, 0.5, 0.8, 1.0)
PATHS = (
    ("http_binary", "http_binary", "batched"),
    ("http_json", "http_json", "batched"),
    ("grpc", "grpc", "batched"),
    ("http_binary_unbatched", "http_binary", "unbatched"),
)


def _context(data_dir: Path, threads: int, **settings: Any) -> CloudContext:
    config = CloudSettings(
        data_dir=data_dir,
        admin_token=TOKEN,
        inference_threads=threads,
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
        """One job's result, with the CPU this (serving) process spent meanwhile."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        cpu = time.process_time()
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        result: dict[str, Any] = json.loads(self.process.stdout.readline())
        result["server_cpu_s"] = time.process_time() - cpu
        return result

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(30)


def _in_process(
    service: InferenceService, name: str, row: dict[str, np.ndarray], concurrency: int,
    seconds: float,
) -> dict[str, float]:  # fmt: skip
    info = service.catalog.resolve(name, None)

    def make() -> Callable[[], bool]:
        def call() -> bool:
            service.infer(info, lambda: InferRequest(inputs=dict(row)))
            return True

        return call

    return stats(closed_loop(make, concurrency, seconds))


def _batch_histogram(service: InferenceService, name: str) -> dict[str, float]:
    registry = service.metrics.registry
    labels = {"model": name, "version": "1"}
    out: dict[str, float] = {}
    for bound in ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0"):
        value = registry.get_sample_value("nv_inference_batch_size_bucket", {**labels, "le": bound})
        out[f"le_{bound.removesuffix('.0')}"] = value or 0.0
    count = registry.get_sample_value("nv_inference_batch_size_count", labels) or 1.0
    out["mean"] = round(
        (registry.get_sample_value("nv_inference_batch_size_sum", labels) or 0) / count, 2
    )
    return out


def _rounds(
    configs: dict[str, Callable[[], dict[str, float]]], repeats: int
) -> dict[str, dict[str, float]]:
    """Each configuration once per round, ``repeats`` rounds; the median of each."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, run in configs.items():
            runs[name].append(run())
    medians: dict[str, Any] = {name: median_of(r) for name, r in runs.items()}
    # Each round's throughputs, for ratios paired within a round (see _paired).
    medians["_rounds"] = {name: [r["throughput_per_s"] for r in rs] for name, rs in runs.items()}
    return medians


def _bare_engine(engine: Engine, rows: dict[str, np.ndarray], seconds: float) -> dict[str, float]:
    """The engine alone, back to back for ``seconds``: rows/s (not calls/s) and latency."""
    batch = len(next(iter(rows.values())))

    def make() -> Callable[[], bool]:
        return lambda: bool(engine.run(rows))

    cpu = time.process_time()
    result = closed_loop(make, 1, seconds)
    result["server_cpu_s"] = time.process_time() - cpu
    figures = stats(result)
    figures["throughput_per_s"] = round(figures["throughput_per_s"] * batch, 1)
    return figures


def _serve_and_load(
    model: BenchModel,
    contexts: dict[str, CloudContext],
    engine: tuple[Engine, int],
    quick: bool,
) -> dict[str, Any]:
    """The services under load; ``engine`` (the bare session and its best batch size) takes
    its turn in the closed-loop rounds, so HTTP and the ceiling meet the same neighbours."""
    repeats = 1 if quick else 5
    seconds = model.seconds[1 if quick else 0]
    sweep = (1, 16) if quick else (1, 4, 16, 32)
    row = model.rows(1)
    services = {kind: InferenceService(ctx) for kind, ctx in contexts.items()}
    grpc = GrpcServer(services["batched"], host="127.0.0.1", port=0)
    grpc_port = grpc.start()
    client = Client()
    results: dict[str, Any] = {}
    try:
        with (
            _served(services["batched"], contexts["batched"]) as url_b,
            _served(services["unbatched"], contexts["unbatched"]) as url_u,
        ):
            urls = {"batched": url_b, "unbatched": url_u}
            print(f"{model.name}: in-process batcher ...", flush=True)
            in_process = _rounds(
                {
                    f"{kind}/{c}": (lambda s=s, c=c: _in_process(s, model.name, row, c, seconds))
                    for kind, s in services.items()
                    for c in sweep
                },
                repeats,
            )
            results["in_process"] = {
                kind: {c: in_process[f"{kind}/{c}"] for c in sweep} for kind in services
            }
            results["in_process_rounds"] = in_process["_rounds"]
            common = {
                "model": model.name,
                "token": TOKEN,
                "inputs": {
                    n: {"data": a.tolist(), "datatype": datatype_of(a)} for n, a in row.items()
                },
                "grpc": f"127.0.0.1:{grpc_port}",
            }

            def job(**kw: Any) -> Callable[[], dict[str, float]]:
                return lambda: stats(client.run(**common, **kw))

            print(f"{model.name}: closed loop ...", flush=True)
            bare, best = engine
            batches = sorted({1, best})
            batch_rows = {b: {k: v[:b] for k, v in model.rows(best).items()} for b in batches}
            closed_runs = _rounds(
                {
                    **{
                        f"engine/{b}": (lambda b=b: _bare_engine(bare, batch_rows[b], seconds))
                        for b in batches
                    },
                    **{
                        f"{name}/{c}": job(
                            url=urls[kind],
                            transport=transport,
                            mode="closed",
                            concurrency=c,
                            duration=seconds,
                        )
                        for name, transport, kind in PATHS
                        for c in sweep
                    },
                },
                repeats,
            )
            results["engine_in_rounds"] = {b: closed_runs[f"engine/{b}"] for b in batches}
            results["closed_loop_rounds"] = closed_runs["_rounds"]
            closed = {
                name: {c: closed_runs[f"{name}/{c}"] for c in sweep} for name, _t, _k in PATHS
            }
            results["closed_loop"] = closed
            capacity = max(p["throughput_per_s"] for p in closed["http_binary"].values())
            results["capacity_http_binary_per_s"] = capacity
            print(f"{model.name}: open loop at {capacity:.0f} req/s x {SHARES} ...", flush=True)
            open_runs = _rounds(
                {
                    f"{kind}/{share:.0%}": job(
                        url=urls[kind],
                        transport="http_binary",
                        mode="open",
                        rate=capacity * share,
                        duration=seconds,
                    )
                    for share in SHARES
                    for kind in urls
                },
                repeats,
            )
            results["open_loop"] = {
                kind: {f"{share:.0%}": open_runs[f"{kind}/{share:.0%}"] for share in SHARES}
                for kind in urls
            }
            results["batch_size_histogram_batched"] = _batch_histogram(
                services["batched"], model.name
            )
    finally:
        client.close()
        grpc.stop(0)
        for service in services.values():
            service.close()
    return results


def _one_model(model: BenchModel, quick: bool, delay_ms: float, threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="b3-") as tmp:
        batched_ctx = _context(
            Path(tmp), threads, inference_max_batch_size=32, inference_max_queue_delay_ms=delay_ms
        )
        unbatched_ctx = dataclasses.replace(
            batched_ctx,
            settings=batched_ctx.settings.model_copy(update={"inference_max_batch_size": 1}),
        )
        try:
            print(f"{model.name}: building and registering ...", flush=True)
            sha256 = register(batched_ctx, model)
            results: dict[str, Any] = {"what": model.what, "rows_per_request": 1}
            print(f"{model.name}: engine ceiling ...", flush=True)
            path = batched_ctx.artifacts.path(sha256)
            results["engine"] = engine_ceiling(path, model, threads, quick)
            print(f"{model.name}: engine threads ...", flush=True)
            results["engine_threads"] = engine_threads(path, model, quick)
            contexts = {"batched": batched_ctx, "unbatched": unbatched_ctx}
            best = max(results["engine"], key=lambda e: e["throughput_per_s"])["batch"]
            bare = open_engine(path, providers=["CPUExecutionProvider"], threads=threads)
            results.update(_serve_and_load(model, contexts, (bare, best), quick))
        finally:
            batched_ctx.close()
    results["ratios"] = ratios(results)
    return results


def _option(argv: list[str], name: str) -> list[str]:
    return [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    delay_ms = float((_option(argv, "delay-ms") or ["0"])[-1])
    threads = int((_option(argv, "threads") or ["1"])[-1])
    wanted = _option(argv, "model") or list(MODELS)
    unknown = sorted(set(wanted) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")
    results: dict[str, Any] = {"delay_ms": delay_ms, "threads": threads, "models": {}}
    for name in wanted:
        model = MODELS[name]
        missing = available(model)
        if missing is not None:
            print(f"{name}: skipped ({missing})", flush=True)
            results["models"][name] = {"skipped": missing}
            continue
        results["models"][name] = _one_model(model, quick, delay_ms, threads)
        print(json.dumps({name: results["models"][name]["ratios"]}, indent=2), flush=True)
    path = write("b3_inference", results)
    print(f"wrote {path}")
