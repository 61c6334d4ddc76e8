"""The local API (a real LocalApi on a free port over a real Agent): KServe v2 answers, clear
4xx errors, and an engine failure answered as a JSON 500 — never a reset connection or a
traceback — after which the next request is served."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.local_api import LocalApi
from shared.messages import Manifest, RoutingPolicy, RoutingSpec, TensorSpec
from shared.tensors import HEADER_LENGTH, decode_response, encode_request
from tests.edge_agent.support import agent_settings, lookup_model, manifest_for, tiny_classifier


@dataclass
class Served:
    agent: Agent
    url: str


def _serve(agent: Agent, tmp_path: Path, data: bytes, manifest: Manifest) -> None:
    path = tmp_path / f"{manifest.model}.onnx"
    path.write_bytes(data)
    agent.runtime.swap(agent.runtime.load(manifest, path))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """An agent serving a classifier ("m") and a lookup model that the engine refuses to run
    for an index outside its table ("lookup"); no broker, no cloud."""
    agent = Agent(agent_settings(tmp_path / "agent"))
    _serve(agent, tmp_path, tiny_classifier(seed=5), manifest_for(tiny_classifier(seed=5)))
    lookup = lookup_model()
    _serve(
        agent,
        tmp_path,
        lookup,
        manifest_for(
            lookup,
            model="lookup",
            inputs=[TensorSpec(name="index", datatype="INT64", shape=[-1])],
        ),
    )
    api = LocalApi(agent, "127.0.0.1", 0)
    api.start()
    try:
        yield Served(agent, api.url)
    finally:
        api.stop()
        agent.cloud.close()


def _lookup(url: str, index: int) -> httpx.Response:
    body = {"inputs": [{"name": "index", "datatype": "INT64", "shape": [1], "data": [index]}]}
    return httpx.post(f"{url}/v2/models/lookup/infer", json=body, timeout=10)


def test_an_engine_error_is_a_json_500_and_the_next_request_is_served(served: Served) -> None:
    failed = _lookup(served.url, 12)
    assert failed.status_code == 500
    error = failed.json()["error"]
    assert error.startswith("lookup:1 failed: ")
    assert "Traceback" not in failed.text
    assert "\n" not in error
    ok = _lookup(served.url, 3)
    assert ok.status_code == 200, ok.text
    assert ok.json()["outputs"][0]["shape"] == [1, 3]
    assert served.agent.meter.totals["engine_errors"] == 1
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'edgefleet_agent_events_total{kind="engine_errors"} 1' in metrics
    assert 'edgefleet_agent_events_total{kind="answers_edge"} 1' in metrics


def test_an_unexpected_failure_is_a_json_500_without_details(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug anywhere behind the API (here a KeyError from the router) is still an answer."""

    def broken(model: str, inputs: object) -> object:
        raise KeyError("probabilities")

    monkeypatch.setattr(served.agent.router, "infer", broken)
    failed = _lookup(served.url, 3)
    assert failed.status_code == 500
    assert failed.json() == {"error": "internal error"}
    monkeypatch.undo()
    assert _lookup(served.url, 3).status_code == 200


def test_binary_tensors_answer_with_where_the_answer_came_from(served: Served) -> None:
    body, headers = encode_request(
        {"input": np.ones((2, 4), dtype=np.float32)}, binary=True, outputs=["probabilities"]
    )
    response = httpx.post(f"{served.url}/v2/models/m/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    parsed = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
    assert parsed.model_version == "1"
    assert parsed.outputs["probabilities"].shape == (2, 3)
    assert parsed.parameters["source"] == "edge"
    assert parsed.parameters["degraded"] is False


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        (
            "/v2/models/m/infer",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]},
            400,
            "has shape [1, 3], the model wants [-1, 4]",
        ),
        (
            "/v2/models/nope/infer",
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]},
            404,
            "no model 'nope'",
        ),
        ("/v2/models/m/infer", {"inputs": "no"}, 400, "'inputs' must be a non-empty list"),
        ("/v1/elsewhere", {}, 404, "no route /v1/elsewhere"),
    ],
    ids=["shape", "unknown-model", "malformed", "no-route"],
)
def test_bad_requests_get_a_clear_4xx(
    served: Served, path: str, body: object, status: int, error: str
) -> None:
    response = httpx.post(f"{served.url}{path}", json=body)
    assert response.status_code == status
    assert error in response.json()["error"]


def test_health_metadata_and_metrics(served: Served) -> None:
    assert httpx.get(f"{served.url}/v2/health/live").json() == {"status": "ok"}
    assert httpx.get(f"{served.url}/v2/health/ready").status_code == 200
    meta = httpx.get(f"{served.url}/v2/models/m").json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"][0]["name"] == "input"
    assert httpx.get(f"{served.url}/v2/models/m/ready").json() == {"ready": True}
    metrics = httpx.get(f"{served.url}/metrics").text
    assert 'edgefleet_agent_active_version{model="lookup"} 1' in metrics
    assert "edgefleet_agent_mqtt_connected 0" in metrics
    assert "edgefleet_agent_telemetry_buffered 0" in metrics


def _raw(url: str, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection and read until the server closes it."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_head_answers_headers_only_and_other_methods_a_json_405(served: Served) -> None:
    """HEAD is GET without the body; a method the API does not have is a JSON 405."""
    head = httpx.head(f"{served.url}/v2/health/live")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == str(len(b'{"status": "ok"}'))
    refused = httpx.delete(f"{served.url}/v2/models/m")
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET, HEAD, POST"
    assert refused.json() == {"error": "method DELETE not allowed"}


def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body(
    served: Served,
) -> None:
    """curl sends Expect: 100-continue for larger bodies and waits for the interim answer."""
    body = b'{"inputs": [{"name": "index", "datatype": "INT64", "shape": [1], "data": [3]}]}'
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v2/models/lookup/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = b""
        while b"\r\n\r\n" not in interim:
            interim += sock.recv(1)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in answer


@pytest.mark.parametrize(
    ("flag", "content_type"),
    [(False, "application/json"), (True, "application/octet-stream")],
)
def test_binary_data_output_follows_the_json_boolean(
    served: Served, flag: bool, content_type: str
) -> None:
    """JSON false asks for JSON tensors, JSON true for Triton's binary extension."""
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "parameters": {"binary_data_output": flag},
    }
    answer = httpx.post(f"{served.url}/v2/models/m/infer", json=body)
    assert answer.status_code == 200
    assert answer.headers["content-type"] == content_type


def test_a_bad_header_length_is_blamed_on_that_header(served: Served) -> None:
    """A JSON header said to be longer than the whole body: the error names that header."""
    body = b'{"inputs": []}'
    answer = _raw(
        served.url,
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Inference-Header-Content-Length: 99\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert answer.endswith(
        b'{"error": "Inference-Header-Content-Length 99 outside a 14-byte body"}'
    )


def test_each_row_says_where_it_came_from_and_the_offload_rate_is_counted(
    served: Served,
) -> None:
    """Every row is hard (threshold above any probability) and no cloud listens: each row is
    the local answer flagged degraded, and hard ÷ total rows is in telemetry and /metrics."""
    served.agent.router.override = RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=1.01)
    body, headers = encode_request({"input": np.ones((3, 4), dtype=np.float32)}, binary=True)
    response = httpx.post(f"{served.url}/v2/models/m/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    parsed = decode_response(response.content, int(response.headers[HEADER_LENGTH]))
    rows = parsed.parameters["rows"]
    assert [(r["source"], r["version"], r["degraded"]) for r in rows] == [("edge", 1, True)] * 3
    assert all(0 < r["confidence"] < 1 and r["latency_ms"] > 0 for r in rows)
    assert parsed.parameters["offloaded"] == 3

    served.agent.router.override = None  # the manifest has no routing: all local
    served.agent.infer("m", {"input": np.ones((1, 4), dtype=np.float32)})

    window = served.agent.meter.snapshot({})
    assert (window.counts["rows_total"], window.counts["rows_hard"]) == (4, 3)
    assert window.counts["rows_degraded"] == 3
    assert "edgefleet_agent_offload_rate 0.75" in httpx.get(f"{served.url}/metrics").text
