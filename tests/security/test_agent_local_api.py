"""Hostile clients of the agent's local API (a real LocalApi over a real Agent): every request
gets an HTTP answer with a JSON error, within bounded time, threads and bytes, and the server
serves the next client normally afterwards."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge_agent.agent import Agent
from edge_agent.local_api import LocalApi
from shared.messages import RoutingPolicy, RoutingSpec
from shared.tensors import HEADER_LENGTH, encode_request
from tests.edge_agent.support import agent_settings, manifest_for, tiny_classifier
from tests.security.helpers import exchange

WORKERS = 2
MAX_CONNECTIONS = 16
MAX_BYTES = 1024 * 1024
TIMEOUT_S = 0.5
INFER = "/v2/models/m/infer"


@dataclass
class Served:
    agent: Agent
    url: str

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.url.removeprefix("http://").split(":")
        return host, int(port)

    def connect(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=10)

    def infer(self, rows: int = 1) -> httpx.Response:
        body, headers = encode_request({"input": np.ones((rows, 4), dtype=np.float32)})
        return httpx.post(f"{self.url}{INFER}", content=body, headers=headers, timeout=10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A classifier routed by max_prob (so the router computes a confidence per batch), on
    an API with small limits: 2 workers, 16 connections, 1 MiB requests, a 0.5 s timeout."""
    agent = Agent(
        agent_settings(
            tmp_path / "agent",
            api_workers=WORKERS,
            api_max_connections=MAX_CONNECTIONS,
            api_max_request_bytes=MAX_BYTES,
            api_read_timeout_s=TIMEOUT_S,
        )
    )
    data = tiny_classifier(seed=5)
    (tmp_path / "m.onnx").write_bytes(data)
    manifest = manifest_for(data, routing=RoutingSpec(policy=RoutingPolicy.MAX_PROB, threshold=0))
    agent.runtime.swap(agent.runtime.load(manifest, tmp_path / "m.onnx"))
    api = LocalApi(agent, "127.0.0.1", 0)
    api.start()
    try:
        yield Served(agent, api.url)
        # Whatever a test did, the server still answers the next client.
        assert served_normally(Served(agent, api.url))
    finally:
        api.stop()
        agent.cloud.close()


def served_normally(served: Served) -> bool:
    answer = served.infer()
    return answer.status_code == 200 and answer.headers[HEADER_LENGTH].isdigit()


def read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str], bytes]:
    """One response from a keep-alive connection (its body sized by Content-Length)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a full response head: {bytes(buffer)!r}")
        buffer += chunk
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed within a response body")
        rest += chunk
    buffer[:] = rest[length:]
    return int(lines[0].split()[1]), headers, rest[:length]


def error_of(status: int, headers: dict[str, str], body: bytes, expected: int) -> str:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    message = json.loads(body)["error"]
    assert isinstance(message, str)
    return message


def closed_cleanly(sock: socket.socket) -> bool:
    """The server closed the connection with a FIN after whatever it sent (not a reset)."""
    while chunk := sock.recv(65536):
        del chunk
    return True


def post_head(length: int, path: str = INFER) -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n".encode()


def test_deeply_nested_json_is_a_400_and_the_server_goes_on(served: Served) -> None:
    """100,000 nested arrays: once a JSON 500 (before that a closed connection)."""
    body = b'{"inputs":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    answer = httpx.post(f"{served.url}{INFER}", content=body, timeout=10)
    assert answer.status_code == 400
    assert answer.json() == {"error": "malformed JSON: nested too deeply"}
    assert served.infer().status_code == 200
    assert served.agent.meter.totals.get("errors", 0) == 0


def test_a_body_sent_to_an_unknown_path_does_not_garble_the_next_request(
    served: Served,
) -> None:
    """Two requests pipelined on one connection: the unread body used to be parsed as the
    second request line (a 400 in HTML, and the real second request lost)."""
    body = b'{"inputs": []}'
    with served.connect() as sock:
        sock.sendall(
            post_head(len(body), "/v1/elsewhere")
            + body
            + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        buffer = bytearray()
        assert error_of(*read_response(sock, buffer), 404) == "no route /v1/elsewhere"
        status, _, live = read_response(sock, buffer)
        assert (status, json.loads(live)) == (200, {"status": "ok"})


def test_an_empty_batch_is_refused_for_what_it_is(served: Served) -> None:
    """Zero rows used to reach the router and come back as a 'bad Inference-Header-...'."""
    empty = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [0, 4], "data": []}]}
    answer = httpx.post(f"{served.url}{INFER}", json=empty)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error == "empty batch: input 'input' has shape [0, 4]; send at least one row"
    assert served.agent.meter.totals.get("errors", 0) == 0


@pytest.mark.parametrize(
    ("sent", "what"),
    [
        (post_head(100) + b'{"inputs": ', "the 100-byte body did not arrive"),
        (b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\n", "no complete request head"),
    ],
    ids=["short-body", "short-head"],
)
def test_a_client_that_stops_sending_gets_a_408(served: Served, sent: bytes, what: str) -> None:
    """More stalled clients than workers: each gets a 408 after the read timeout (once they
    waited forever), and a normal request is answered meanwhile."""
    stalled = [served.connect() for _ in range(2 * WORKERS)]
    try:
        for sock in stalled:
            sock.sendall(sent)
        assert served_normally(served)
        for sock in stalled:
            message = error_of(*read_response(sock, bytearray()), 408)
            assert message.startswith(what)
            assert closed_cleanly(sock)
    finally:
        for sock in stalled:
            sock.close()


def test_a_client_that_stops_reading_is_cut_off(served: Served) -> None:
    """Requests pipelined by a client that never reads its answers: once the answers have
    filled the socket buffers the server waits the timeout, then drops the connection (it
    used to block a thread on the write forever) and goes on serving."""
    rows = {"name": "input", "datatype": "FP32", "shape": [1024, 4], "data": [0.5] * 4096}
    body = json.dumps({"inputs": [rows]}).encode()

    def send_without_reading(sock: socket.socket) -> None:
        for _ in range(10_000):
            sock.sendall(post_head(len(body)) + body)

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(served.address)
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            send_without_reading(sock)


def test_request_bytes_are_capped_before_the_body_is_read(served: Served) -> None:
    """Content-Length over the cap is refused at once (the body is never waited for), and a
    client that does send the whole oversized body still reads its 413, not a reset."""
    with served.connect() as sock:
        sock.sendall(post_head(MAX_BYTES + 1))
        message = error_of(*read_response(sock, bytearray()), 413)
        assert (
            message
            == f"a request body of {MAX_BYTES + 1} bytes exceeds the limit of {MAX_BYTES} bytes"
        )
    too_big = np.ones((MAX_BYTES // 16 + 1, 4), dtype=np.float32)
    body, headers = encode_request({"input": too_big})
    answer = httpx.post(f"{served.url}{INFER}", content=body, headers=headers, timeout=10)
    assert answer.status_code == 413
    assert answer.json()["error"].startswith(f"a request body of {len(body)} bytes exceeds")


def test_batch_rows_are_capped_from_the_declared_shape(served: Served) -> None:
    """1,025 rows (the default cap is 1,024) are refused; a shape that declares 10^6 rows is
    refused on the shape alone, before its (absent) data is looked at."""
    assert served.infer(rows=1024).status_code == 200
    answer = served.infer(rows=1025)
    assert answer.status_code == 413
    assert answer.json() == {
        "error": "tensor 'input': a batch of 1025 rows exceeds the limit of 1024"
    }
    declared = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [10**6, 4], "data": []}]}
    answer = httpx.post(f"{served.url}{INFER}", json=declared)
    assert answer.status_code == 413
    assert "1000000 rows" in answer.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "outputs", "error"),
    [
        (
            {"binary_data_output": "false"},
            None,
            'parameters binary_data_output must be a JSON boolean (true or false), not "false"',
        ),
        (
            {"binary_data_output": 0},
            None,
            "parameters binary_data_output must be a JSON boolean (true or false), not 0",
        ),
        (
            None,
            [{"name": "probabilities", "parameters": {"binary_data": "true"}}],
            "output 'probabilities' binary_data must be a JSON boolean (true or false), "
            'not "true"',
        ),
    ],
    ids=["string-false", "zero", "output-string"],
)
def test_binary_flags_are_json_booleans_only(
    served: Served, parameters: object, outputs: object, error: str
) -> None:
    """The string "false" used to count as true (a binary answer nobody asked for)."""
    body: dict[str, object] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]
    }
    if parameters is not None:
        body["parameters"] = parameters
    if outputs is not None:
        body["outputs"] = outputs
    answer = httpx.post(f"{served.url}{INFER}", json=body)
    assert answer.status_code == 400
    assert answer.json() == {"error": error}


def test_slow_connections_hold_no_threads(served: Served) -> None:
    """Twice the connection limit in silent clients plus stalled ones: the thread count
    stays at the loop plus the workers (once one thread per connection), a normal request
    is answered meanwhile, the stalled get a 408 and the silent a quiet close."""
    assert served_normally(served)
    baseline = threading.active_count()
    stalled = [served.connect() for _ in range(3 * WORKERS)]
    for sock in stalled:
        sock.sendall(post_head(100) + b"{")
    silent = [served.connect() for _ in range(2 * MAX_CONNECTIONS)]
    try:
        assert served_normally(served)
        assert threading.active_count() <= baseline + WORKERS
        for sock in stalled:
            error_of(*read_response(sock, bytearray()), 408)
        for sock in silent:
            assert closed_cleanly(sock)
        assert threading.active_count() <= baseline + WORKERS
    finally:
        for sock in stalled + silent:
            sock.close()


def test_at_the_connection_limit_new_clients_wait_and_are_answered(served: Served) -> None:
    """Every connection slot held by a client that stopped mid-request: a new client waits
    in the bounded backlog (no thread, no 503) and is answered once the stalled time out."""
    stalled = [served.connect() for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\n")
        assert served_normally(served)
        for sock in stalled:
            error_of(*read_response(sock, bytearray()), 408)
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "error"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed request line"),
        (b"GET /v2/health/live HTTP/2.0\r\n\r\n", 505, "unsupported HTTP/2.0"),
        (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414, "request line longer than"),
        (
            b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n",
            431,
            "more than 100 header lines",
        ),
        (b"GET / HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431, "header line longer"),
        (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed header line"),
        (
            b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\n\r\n",
            501,
            "Transfer-Encoding is not supported",
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "bad Content-Length 'abc'"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
            400,
            "conflicting Content-Length",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
            413,
            "a request body of 9999",
        ),
        (
            b"DELETE /v2/models/m HTTP/1.1\r\nConnection: close\r\n\r\n",
            405,
            "method DELETE not allowed",
        ),
        (
            b"POST /v2/models/m/infer HTTP/1.1\r\nConnection: close\r\n"
            b"Inference-Header-Content-Length: 1e3\r\nContent-Length: 2\r\n\r\n{}",
            400,
            "Inference-Header-Content-Length must be a byte count within the body, got '1e3'",
        ),
    ],
    ids=[
        "request-line",
        "http2",
        "long-uri",
        "many-headers",
        "long-header",
        "no-colon",
        "chunked",
        "length-text",
        "two-lengths",
        "length-digits",
        "method",
        "header-length",
    ],
)
def test_every_malformed_request_gets_a_json_answer(
    served: Served, request_bytes: bytes, status: int, error: str
) -> None:
    """What http.server answered in HTML (or not at all) is a JSON error, then a clean close."""
    got, headers, body = exchange(served.url, request_bytes)
    assert error in error_of(got, headers, body, status)
    assert headers["connection"] == "close"
