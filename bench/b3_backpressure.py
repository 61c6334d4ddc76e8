"""B3 (issue 9) — cloud backpressure: the agents' offload rate against the budget the cloud
publishes, over time, through a load and after it.

    python -m bench b3_backpressure [--quick]

Real parts, as `make demo` runs them: the embedded rumqttd broker and Redis (child
processes), the inference service on uvicorn serving digits-cloud with its budget loop
(defaults but for a 50 ms queue bound, 1 s hold, 2 s relax, 0.25 s interval), and in-process
`Agent`s running digits-edge calibrated to offload 30 % (with its curve), over MQTT and HTTP.
The cloud is slowed on purpose (20 ms more per batch of one, 50 requests/s at most) so a few
agents saturate it on any machine. Each agent gets 4 threads sending one held-out digit at a
time, flat out, for the load phase; then one thread, a digit every 50 ms. Every 0.5 s: the
budget in force (Redis), what the agents offloaded in that half second (rows hard / rows),
and the queue wait the loop saw.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn

from bench.common import write
from cloud.context import CloudContext
from cloud.embedded.processes import free_port
from cloud.embedded.services import EmbeddedServices
from cloud.inference.app import create_inference_app
from cloud.inference.budget import BudgetLoop, budget_loop_for
from cloud.inference.catalog import VersionInfo
from cloud.inference.engine import Engine, open_engine
from cloud.inference.service import InferenceService
from cloud.pipeline.calibrate import RoutingTarget, calibrate
from cloud.pipeline.reference import digits
from cloud.pipeline.register import register_version
from cloud.registry import repository
from cloud.settings import CloudSettings
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared.messages import (
    ArtifactRef,
    CloudModelRef,
    Manifest,
    RoutingPolicy,
    RoutingSpec,
    TensorSpec,
)
from shared.signing import generate_key, public_key_b64

TOKEN = "bench-admin-token-0123456789"  # noqa: S105 - a throwaway cloud
DELAY_S = 0.02
THREADS_PER_AGENT = 4
LIGHT_PAUSE_S = 0.05  # after the load: one thread per agent, a digit every 50 ms
SAMPLE_S = 0.5
QUEUE_WAIT = "edgefleet_inference_queue_wait_seconds"


class _Slow(Engine):
    def run(self, inputs: dict[str, Any]) -> dict[str, Any]:
        time.sleep(DELAY_S)
        return super().run(inputs)


def _register(context: CloudContext, name: str, data: bytes) -> None:
    with context.database.session() as session:
        repository.create_model(session, name=name)
        register_version(
            session, context.artifacts, model_name=name, blocks=[data], max_bytes=len(data) + 1,
            precision="fp32", actor="bench",
        )  # fmt: skip


def _routing(edge: bytes, splits: digits.DigitsSplits) -> RoutingSpec:
    session = ort.InferenceSession(edge, providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {"input": splits.x_calib.astype(np.float32)})[0]
    found = calibrate(probs, splits.y_calib, target=RoutingTarget("budget", 0.3), learned=False)
    return RoutingSpec(
        policy=RoutingPolicy.MAX_PROB,
        threshold=found.threshold("max_prob"),
        curve=found.curves["max_prob"],
        cloud_model=CloudModelRef(name="digits-cloud", version=1),
    )


def _agent(
    context: CloudContext, url: str, root: Path, edge: bytes, spec: RoutingSpec, i: int
) -> Agent:
    device_id = f"bench-bp-{i}"
    with context.database.session() as session:
        token = repository.enroll_device(session, device_id=device_id)[1]
    agent = Agent(
        AgentSettings(
            device_id=device_id, token=token, cloud_url=url, mqtt_url=context.urls.mqtt_url,
            public_key=public_key_b64(generate_key().public_key()), data_dir=root / device_id,
            api_port=0, cloud_budget_s=2.0, cloud_breaker_failures=1000,
        )
    )  # fmt: skip
    path = root / "edge.onnx"
    manifest = Manifest(
        model="digits-edge", version=1, precision="fp32", artifact=ArtifactRef.of(edge, 65536),
        inputs=[TensorSpec(name="input", datatype="FP32", shape=[-1, 64])],
        outputs=[TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])],
        routing=spec,
    )  # fmt: skip
    agent.runtime.swap(agent.runtime.load(manifest, path))
    agent.start(serve_api=False)
    return agent


def _load(
    agents: list[Agent], x: np.ndarray, stop: threading.Event, *, threads: int, pause_s: float
) -> list[threading.Thread]:
    def send(agent: Agent, k: int) -> None:
        i = k * 37
        while not stop.wait(pause_s):
            agent.infer("digits-edge", {"input": x[i % len(x) : i % len(x) + 1]})
            i += 1

    started = [
        threading.Thread(target=send, args=(a, k), daemon=True)
        for a in agents
        for k in range(threads)
    ]
    for thread in started:
        thread.start()
    return started


def _timeline(
    agents: list[Agent],
    loop: BudgetLoop,
    service: InferenceService,
    load_s: float,
    rest_s: float,
    x: np.ndarray,
) -> list[dict[str, Any]]:
    heavy, light = threading.Event(), threading.Event()
    rows: list[dict[str, Any]] = []
    wait = service.metrics.registry.get_sample_value
    started = time.monotonic()
    threads = _load(agents, x, heavy, threads=THREADS_PER_AGENT, pause_s=0.0)
    last = [(a.meter.totals["rows_total"], a.meter.totals["rows_hard"]) for a in agents]
    budget_before = 1.0
    while time.monotonic() - started < load_s + rest_s:
        time.sleep(SAMPLE_S)
        if not heavy.is_set() and time.monotonic() - started >= load_s:
            heavy.set()
            threads += _load(agents, x, light, threads=1, pause_s=LIGHT_PAUSE_S)
        now = [(a.meter.totals["rows_total"], a.meter.totals["rows_hard"]) for a in agents]
        total = sum(n[0] - p[0] for n, p in zip(now, last, strict=True))
        hard = sum(n[1] - p[1] for n, p in zip(now, last, strict=True))
        last = now
        state = loop.state
        budget = 1.0 if state is None else state.max_offload
        rows.append(
            {
                "t_s": round(time.monotonic() - started, 2),
                "load": "heavy" if not heavy.is_set() else "light",
                "budget": round(budget, 4),
                "budget_before": round(budget_before, 4),
                "rows": total,
                "offload": round(hard / total, 4) if total else None,
                "queue_wait_ms": round(1000 * (wait(QUEUE_WAIT) or 0.0), 1),
                "saturated": loop.detector.saturated,
            }
        )
        budget_before = budget
    light.set()
    for thread in threads:
        thread.join(10)
    return rows


def _summary(
    rows: list[dict[str, Any]], load_s: float, natural: float, in_flight: int
) -> dict[str, Any]:
    """Over budget: more hard rows in a half second than the larger budget in force during
    it allows, past the calls in flight when it began and one credit per agent (a row is
    counted when its answer comes back, maybe under a later budget than it was decided)."""
    budgeted = [
        r for r in rows if r["offload"] is not None and max(r["budget"], r["budget_before"]) < 1
    ]
    over = [
        r for r in budgeted
        if r["offload"] * r["rows"] > max(r["budget"], r["budget_before"]) * r["rows"] + in_flight
    ]  # fmt: skip
    light = [r for r in rows if r["load"] == "light" and r["budget"] == 1 and r["rows"]]
    light_rows = sum(r["rows"] for r in light)
    light_hard = sum(r["offload"] * r["rows"] for r in light)
    first = next((r["t_s"] for r in rows if r["budget"] < 1), None)
    cleared = next((r["t_s"] for r in rows if r["t_s"] > load_s and r["budget"] == 1), None)
    return {
        "natural_offload_on_test_split": round(natural, 4),
        "first_budget_at_s": first,
        "lowest_budget": min(r["budget"] for r in rows),
        "intervals_with_a_budget": len(budgeted),
        "intervals_over_budget": len(over),
        "cleared_after_load_stopped_s": None if cleared is None else round(cleared - load_s, 2),
        "offload_after_clear": round(light_hard / light_rows, 4) if light_rows else None,
    }


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    agents_n, load_s, rest_s = (2, 6.0, 16.0) if quick else (3, 20.0, 25.0)
    splits = digits.digits_splits(0)
    x = np.ascontiguousarray(splits.x_test, dtype=np.float32)
    print("building the reference models ...", flush=True)
    edge, cloud = digits.build_edge(splits), digits.build_cloud(splits)
    spec = _routing(edge, splits)
    conf = ort.InferenceSession(edge, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    natural = float((np.asarray(conf).max(axis=1) < spec.threshold).mean())
    with tempfile.TemporaryDirectory(prefix="b3-bp-") as tmp, EmbeddedServices(
        data_dir=Path(tmp) / "services", database_url=f"sqlite:///{tmp}/registry.db", mqtt_url=None,
        redis_url=None, broker="rumqttd",
    ) as services:  # fmt: skip
        assert services.urls is not None
        settings = CloudSettings(
            data_dir=Path(tmp) / "cloud", admin_token=TOKEN, inference_max_batch_size=1,
            inference_providers=["CPUExecutionProvider"], inference_threads=1,
            inference_budget_queue_ms=50.0, inference_budget_hold_s=1.0,
            inference_budget_relax_s=2.0, inference_budget_interval_s=0.25,
        )  # fmt: skip
        context = CloudContext.open(settings, services.urls)
        _register(context, "digits-cloud", cloud)

        def slow(info: VersionInfo) -> Engine:
            path = context.artifacts.path(info.sha256)
            return _Slow(open_engine(path, providers=["CPUExecutionProvider"], threads=1).session)

        service = InferenceService(context, engine=slow)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(create_inference_app(context, service), host="127.0.0.1", port=port,
                           log_level="warning", access_log=False)
        )  # fmt: skip
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.02)
        loop = budget_loop_for(context, service.metrics, service.pool)
        assert loop is not None
        loop.start()
        root = Path(tmp) / "agents"
        root.mkdir()
        (root / "edge.onnx").write_bytes(edge)
        agents = [
            _agent(context, f"http://127.0.0.1:{port}", root, edge, spec, i)
            for i in range(agents_n)
        ]
        try:
            print(f"{agents_n} agents, load {load_s:g}s then {rest_s:g}s light ...", flush=True)
            rows = _timeline(agents, loop, service, load_s, rest_s, x)
        finally:
            for agent in agents:
                agent.stop()
            loop.stop()
            server.should_exit = True
            service.close()
            context.close()
    summary = _summary(rows, load_s, natural, agents_n * (THREADS_PER_AGENT + 1))
    out = write(
        "b3_backpressure",
        {"quick": quick, "agents": agents_n, "threads_per_agent": THREADS_PER_AGENT,
         "cloud_delay_ms": DELAY_S * 1000, "load_s": load_s, "summary": summary,
         "timeline": rows},
    )  # fmt: skip
    for row in rows:
        offload = "  n/a " if row["offload"] is None else f"{100 * row['offload']:5.1f}%"
        print(
            f"t={row['t_s']:5.1f}s load {row['load']:5s} budget "
            f"{100 * row['budget']:5.1f}%  offload {offload}  rows {row['rows']:5d}  "
            f"queue {row['queue_wait_ms']:7.1f} ms"
        )
    print(summary)
    print(f"wrote {out}")
