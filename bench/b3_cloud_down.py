"""B3 (issue 9) — the edge when the cloud is down: "the edge's p99 for hard inputs ≤ edge
time + budget".

    python -m bench b3_cloud_down [--quick]

The agent's own router, runtime and cloud client (in process) on the digits-edge reference
model, one row per call. Edge only (routing always_edge) is the edge time; then every row
is hard (max_prob below 1.01) and the cloud is unreachable two ways: a refused port
(nothing listens) and a black hole (accepts, never answers). Each with the breaker as the
agent runs it (3 failures, 10 s reset) and with it off (every call tries the cloud), with
the agent's default 500 ms latency budget. Cases take turns round by round (bench.common
interleaved), so a noisy neighbour slows them alike; the three warm-up calls of each case
are not counted (with the breaker, they are the ones that open it). KubeEdge Sedna, for
comparison, stalls 12 s or more per hard input when its cloud is down.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import interleaved, percentile, write
from cloud.embedded.processes import free_port
from cloud.pipeline.reference import digits
from edge_agent.router import CircuitBreaker, CloudClient, Router
from edge_agent.runtime import Runtime
from shared.messages import ArtifactRef, Manifest, RoutingPolicy, RoutingSpec, TensorSpec

BUDGET_S = 0.5
MODEL = "digits-edge"


@contextmanager
def black_hole() -> Iterator[int]:
    """A port that accepts connections and never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def _router(path: Path, data: bytes, spec: RoutingSpec, cloud: CloudClient | None) -> Router:
    manifest = Manifest(
        model=MODEL,
        version=1,
        precision="fp32",
        artifact=ArtifactRef.of(data, 64 * 1024),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        routing=spec,
    )
    runtime = Runtime(threads=1)
    runtime.swap(runtime.load(manifest, path))
    return Router(runtime, cloud=cloud)


def _client(port: int, breaker: bool) -> CloudClient:
    return CloudClient(
        f"http://127.0.0.1:{port}",
        "bench-device-token",
        budget_s=BUDGET_S,
        # Off: a breaker that never opens, so every hard input pays the cloud's failure.
        breaker=CircuitBreaker() if breaker else CircuitBreaker(failures=10**9),
    )


def _summary(seconds: list[float], reasons: dict[str, int]) -> dict[str, Any]:
    return {
        "p50_ms": round(statistics.median(seconds) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "max_ms": round(max(seconds) * 1000, 3),
        "calls": len(seconds),
        "reasons": reasons,
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    rounds, calls = (3, 10) if quick else (10, 20)
    splits = digits.digits_splits(0)
    x = np.ascontiguousarray(splits.x_test, dtype=np.float32)
    data = digits.build_edge(splits)
    hard = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=1.01)
    with tempfile.TemporaryDirectory(prefix="b3-down-") as tmp, black_hole() as hole:
        path = Path(tmp) / "edge.onnx"
        path.write_bytes(data)
        refused = free_port()  # nothing listens there
        clients = {
            "refused, breaker": _client(refused, True),
            "refused, no breaker": _client(refused, False),
            "black hole, breaker": _client(hole, True),
            "black hole, no breaker": _client(hole, False),
        }
        routers = {"edge only": _router(path, data, RoutingSpec(policy="always_edge"), None)}
        routers |= {name: _router(path, data, hard, c) for name, c in clients.items()}
        reasons: dict[str, dict[str, int]] = {name: {} for name in routers}
        counter = [0]

        def call(name: str) -> Any:
            def once() -> None:
                counter[0] += 1
                row = x[counter[0] % len(x) : counter[0] % len(x) + 1]
                answer = routers[name].infer(MODEL, {"input": row})
                key = answer.reason or answer.source
                reasons[name][key] = reasons[name].get(key, 0) + 1

            return once

        print(f"{len(routers)} cases x {rounds} rounds x {calls} calls ...", flush=True)
        samples = interleaved(
            {name: call(name) for name in routers}, rounds=rounds, calls=calls, warmup=3
        )
        for client in clients.values():
            client.close()
    results = {name: _summary(s, reasons[name]) for name, s in samples.items()}
    edge_p99 = results["edge only"]["p99_ms"]
    bound_ms = edge_p99 + BUDGET_S * 1000
    for summary in results.values():
        summary["p99_within_edge_plus_budget"] = summary["p99_ms"] <= bound_ms
        summary["p99_over_bound_ms"] = round(summary["p99_ms"] - bound_ms, 3)
    path_out = write(
        "b3_cloud_down",
        {"budget_ms": BUDGET_S * 1000, "edge_p99_ms": edge_p99, "bound_ms": bound_ms,
         "quick": quick, "cases": results},
    )  # fmt: skip
    for name, summary in results.items():
        print(
            f"{name:24s} p50 {summary['p50_ms']:9.3f} ms  p99 {summary['p99_ms']:9.3f} ms  "
            f"within edge+budget: {summary['p99_within_edge_plus_budget']}"
        )
    print(f"wrote {path_out}")
