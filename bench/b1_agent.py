"""B1 (agent) — the agent's local path vs bare `session.run`, MiniLM INT8, batch 1.

    python -m bench b1_agent [--quick]

Engines take turns: bare onnxruntime `session.run`; the agent in-process (`Agent.infer`:
input checks → runtime → router → answer with source/confidence/version/latency); the
agent's local HTTP API with binary tensors and with JSON. Also the agent's resident memory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx
import numpy as np

from bench.common import interleaved, summarize, write
from cloud.pipeline.inspect import inspect_onnx
from cloud.pipeline.quantize import QuantMethod, quantize
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared.messages import ArtifactRef, Manifest
from shared.signing import generate_key, public_key_b64
from shared.tensors import encode_request

THREADS = 2


def _manifest(path: Path, name: str) -> Manifest:
    summary = inspect_onnx(path)
    return Manifest(
        model=name,
        version=1,
        precision="int8",
        artifact=ArtifactRef.of(path.read_bytes(), 1 << 20),
        inputs=summary.inputs,
        outputs=summary.outputs,
    )


def _settings(data_dir: Path) -> AgentSettings:
    return AgentSettings(
        device_id="bench",
        token="b" * 16,
        cloud_url="http://127.0.0.1:9",
        mqtt_url="mqtt://127.0.0.1:9",
        public_key=public_key_b64(generate_key().public_key()),
        data_dir=data_dir,
        api_port=0,
        threads=THREADS,
    )


RSS_SCRIPT = """
import json, sys
from pathlib import Path
from edge_agent.telemetry import rss_bytes
start = rss_bytes()
import numpy as np
from edge_agent.agent import Agent
from edge_agent.config import AgentSettings
from shared.messages import Manifest
imported = rss_bytes()
agent = Agent(AgentSettings.model_validate_json(sys.argv[2]))
agent.start(serve_api=True)
path = Path(sys.argv[1])
agent.runtime.swap(agent.runtime.load(Manifest.model_validate_json(sys.argv[3]), path))
feed = {k: np.array(v, dtype=np.int64) for k, v in json.loads(sys.argv[4]).items()}
for _ in range(200):
    agent.infer("minilm", feed)
CLOUD = ("sqlalchemy", "redis", "fastapi", "torch", "streamlit", "sklearn")
print(json.dumps({
    "interpreter": start, "agent_imported": imported, "serving_minilm_int8": rss_bytes(),
    "cloud_modules_loaded": sorted(m for m in sys.modules if m.split(".")[0] in CLOUD),
}))
agent.stop()
"""


def main(argv: list[str]) -> None:
    quick = "--quick" in argv
    from cloud.pipeline.reference import minilm

    work = Path(tempfile.mkdtemp(prefix="edgefleet-b1-agent-"))
    int8_path = work / "minilm-int8.onnx"
    int8_path.write_bytes(quantize(minilm.export_minilm(), method=QuantMethod.DYNAMIC))
    feed = {k: v[:1].copy() for k, v in minilm.tokenize(minilm.sentences(4)).items()}

    agent = Agent(_settings(work / "agent"))
    agent.start(serve_api=True)
    agent.runtime.swap(agent.runtime.load(_manifest(int8_path, "minilm"), int8_path))
    assert agent.api is not None
    # The agent's own session: the comparison isolates the agent's path, not two thread pools.
    bare = agent.runtime.get("minilm").session
    http = httpx.Client(base_url=agent.api.url)
    binary_body, binary_headers = encode_request(feed, binary=True)
    json_body, json_headers = encode_request(feed, binary=False)

    def via_http(body: bytes, headers: dict[str, str]) -> object:
        response = http.post("/v2/models/minilm/infer", content=body, headers=headers)
        response.raise_for_status()
        return response

    engines = {
        "bare_session_run": lambda: bare.run(None, feed),
        "agent_in_process": lambda: agent.infer("minilm", feed),
        "agent_http_binary": lambda: via_http(binary_body, binary_headers),
        "agent_http_json": lambda: via_http(json_body, json_headers),
    }
    samples = interleaved(engines, rounds=5 if quick else 25, calls=20)
    result = {name: summarize(values, 1) for name, values in samples.items()}
    bare_p50 = result["bare_session_run"]["p50_ms"]
    ratios = {
        "in_process_overhead_pct": round(
            100 * (result["agent_in_process"]["p50_ms"] / bare_p50 - 1), 2
        ),
        "http_binary_added_ms": round(result["agent_http_binary"]["p50_ms"] - bare_p50, 3),
        "http_json_added_ms": round(result["agent_http_json"]["p50_ms"] - bare_p50, 3),
    }
    http.close()
    agent.stop()
    rss = json.loads(
        subprocess.run(
            [sys.executable, "-c", RSS_SCRIPT, str(int8_path),
             _settings(work / "rss").model_dump_json(),
             _manifest(int8_path, "minilm").model_dump_json(),
             json.dumps({k: v.tolist() for k, v in feed.items()})],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
        ).stdout.strip().splitlines()[-1]
    )  # fmt: skip
    payload: dict[str, Any] = {
        "threads": THREADS,
        "batch": 1,
        "engines": result,
        "ratios": ratios,
        "memory": rss,
    }
    for name, row in result.items():
        print(f"{name:20s} p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms")
    print(ratios, {k: f"{v / 2**20:.0f} MiB" if isinstance(v, int) else v for k, v in rss.items()})
    print("wrote", write("b1_agent", payload))
    _ = np
