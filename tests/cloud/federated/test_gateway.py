"""The fleet gateway in front of a recording upstream (a real uvicorn server standing in for
the SuperLink): the Fleet API a SuperNode calls is forwarded with its body and its
authentication headers, streamed both ways; the Control and Runtime APIs and anything else
are refused in JSON and never reach the upstream; an upstream that is down or breaks off is
a JSON 503 or 502, not a reset connection."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import inspect
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from flwr.supernode import fleet_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cloud.embedded.processes import free_port
from cloud.federated.gateway import FLEET_PATHS, FleetGateway, GatewayLimits
from tests.conftest import serve_in_thread

PROTOBUF = "application/protobuf"
MIB = 1024 * 1024


@dataclass
class Seen:
    """What reached the upstream."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    size: int
    sha256: str


@dataclass
class Upstream:
    port: int
    seen: list[Seen] = field(default_factory=list)


def _upstream_app(seen: list[Seen]) -> Starlette:
    async def record(request: Request) -> Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.stream():
            digest.update(chunk)
            size += len(chunk)
        seen.append(
            Seen(request.method, request.url.path, request.url.query,
                 dict(request.headers), size, digest.hexdigest())
        )  # fmt: skip
        answer_size = int(request.headers.get("x-answer-size", "0"))
        if answer_size:

            async def chunks() -> AsyncIterator[bytes]:
                block = b"\x5a" * MIB
                for start in range(0, answer_size, MIB):
                    yield block[: min(MIB, answer_size - start)]

            return StreamingResponse(chunks(), media_type=PROTOBUF, headers={"x-sha": "-"})
        answer = Response(digest.hexdigest().encode(), media_type=PROTOBUF, status_code=200)
        if "x-answer-utf8" in request.headers:
            answer.raw_headers.append((b"x-name", "café ☕".encode()))
        return answer

    return Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    seen: list[Seen] = []
    with serve_in_thread(_upstream_app(seen)) as url:
        yield Upstream(int(url.rsplit(":", 1)[1]), seen)


@contextmanager
def _gateway(upstream_port: int, limits: GatewayLimits | None = None) -> Iterator[str]:
    gateway = FleetGateway(
        host="127.0.0.1", port=free_port(), upstream_port=upstream_port, limits=limits
    )
    gateway.start()
    try:
        yield f"http://127.0.0.1:{gateway.port}"
    finally:
        gateway.stop()


@pytest.fixture
def gateway(upstream: Upstream) -> Iterator[httpx.Client]:
    with _gateway(upstream.port) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.mark.parametrize(
    "path",
    [
        "/v1/control/start-run",
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/control/stop-run",
        "/v1/runtime/acquire-task",
        "/v1/runtime/responses",
        "/health",
        "/docs",
        "/openapi.json",
        "/v1/fleet/no-such-call",
        "/v1/fleet/%2e%2e/control/start-run",
        "/v1/fleet/get-run/../../control/start-run",
    ],
)
def test_anything_but_the_fleet_api_is_refused_and_never_forwarded(
    gateway: httpx.Client, upstream: Upstream, path: str
) -> None:
    """A device asking for the Control API (start a run with its own code, register a node,
    list runs), the Runtime API, or Flower's docs gets a JSON 404 from the gateway itself."""
    request = gateway.build_request(
        "POST", path, content=b"\x0a\x02hi", headers={"content-type": PROTOBUF}
    )
    # httpx would resolve the dots itself: send the path as written.
    request.extensions["target"] = path.encode()

    response = gateway.send(request)

    assert response.status_code == 404
    assert "Fleet API" in response.json()["error"]
    assert upstream.seen == []


def test_a_fleet_call_with_another_method_is_refused(
    gateway: httpx.Client, upstream: Upstream
) -> None:
    response = gateway.get("/v1/fleet/get-run")

    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert upstream.seen == []


def test_every_fleet_call_is_forwarded_with_its_body_and_auth_headers(
    gateway: httpx.Client, upstream: Upstream
) -> None:
    """The SuperNode's signed headers and content type arrive as sent; the query string does
    not (the upstream path is the allowed one alone); the answer comes back as the upstream
    gave it."""
    auth = {"flwr-public-key": "cHVibGlj", "flwr-signature": "c2lnbg==",
            "flwr-timestamp": "2026-12-06T18:00:00+00:00"}  # fmt: skip
    for path in sorted(FLEET_PATHS):
        body = path.encode() * 3
        response = gateway.post(
            path + "?x=1", content=body,
            headers={"content-type": PROTOBUF, "accept": PROTOBUF, "x-hop": "1",
                     "connection": "keep-alive, x-hop", **auth},
        )  # fmt: skip

        assert response.status_code == 200, response.text
        assert response.content == hashlib.sha256(body).hexdigest().encode()
        assert response.headers["content-type"] == PROTOBUF
        seen = upstream.seen[-1]
        assert (seen.method, seen.path, seen.query) == ("POST", path, "")
        assert {k: seen.headers[k] for k in auth} == auth
        assert seen.headers["content-type"] == PROTOBUF
        assert "x-hop" not in seen.headers  # named by Connection: for the first hop only
    assert len(upstream.seen) == len(FLEET_PATHS)


def test_large_bodies_stream_both_ways(gateway: httpx.Client, upstream: Upstream) -> None:
    """A 48 MiB push sent in chunks (no length known up front) and a 48 MiB answer."""
    size = 48 * MIB
    digest = hashlib.sha256()

    def body() -> Iterator[bytes]:
        block = bytes(range(256)) * 4096  # 1 MiB
        for _ in range(size // MIB):
            digest.update(block)
            yield block

    pushed = gateway.post("/v1/fleet/push-object", content=body())
    assert pushed.status_code == 200
    assert upstream.seen[-1].size == size
    assert upstream.seen[-1].sha256 == digest.hexdigest() == pushed.text

    with gateway.stream(
        "POST", "/v1/fleet/pull-object", content=b"x", headers={"x-answer-size": str(size)}
    ) as pulled:
        received = sum(len(chunk) for chunk in pulled.iter_raw())
    assert pulled.status_code == 200
    assert received == size


def test_an_upstream_that_is_down_is_a_json_503() -> None:
    with _gateway(free_port()) as url:
        response = httpx.post(f"{url}/v1/fleet/pull-messages", content=b"x", timeout=30)

    assert response.status_code == 503
    assert "SuperLink" in response.json()["error"]


def test_an_upstream_that_hangs_up_is_a_json_502() -> None:
    """An upstream that accepts the connection and closes it without answering."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with _gateway(port) as url:
            response = httpx.post(f"{url}/v1/fleet/pull-messages", content=b"x", timeout=30)
    finally:
        listener.close()

    assert response.status_code == 502
    assert "SuperLink" in response.json()["error"]


def test_a_taken_port_is_a_clear_error(upstream: Upstream) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        gateway = FleetGateway(host="127.0.0.1", port=port, upstream_port=upstream.port)
        with pytest.raises(Exception, match="could not listen"):
            gateway.start()


def _raw(url: str, head: str, body: bytes = b"") -> socket.socket:
    """A connection that sent ``head`` (CRLF added) and ``body`` and then nothing more."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return conn


def _answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, headers and body of the one answer on ``conn`` (read to its close)."""
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_the_paths_allowed_are_those_flowers_supernode_calls() -> None:
    """Read from flwr itself: a Flower upgrade that adds, drops or renames a Fleet call
    fails here rather than in a device's round."""
    tree = ast.parse(inspect.getsource(fleet_http_client))
    called = {
        keyword.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
        if keyword.arg == "path" and isinstance(keyword.value, ast.Constant)
    }

    assert called
    assert all(path.startswith("/v1/fleet/") for path in called)
    assert called == FLEET_PATHS


@pytest.mark.parametrize(
    "request_line",
    ["TRACE /v1/fleet/get-run", "FOO /v1/fleet/get-run", "OPTIONS *", "PROPFIND /x"],
)
def test_every_refusal_is_json(
    gateway: httpx.Client, upstream: Upstream, request_line: str
) -> None:
    """Methods no route names and targets that are not paths get the gateway's JSON, not
    Starlette's plain text."""
    conn = _raw(str(gateway.base_url), f"{request_line} HTTP/1.1\nHost: x\nConnection: close\n")

    status, headers, body = _answer(conn)

    assert status in (404, 405)
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]
    assert upstream.seen == []


def test_forwarding_headers_from_the_client_are_replaced_by_the_real_peer(
    gateway: httpx.Client, upstream: Upstream
) -> None:
    """The SuperLink's uvicorn trusts X-Forwarded-* from 127.0.0.1, i.e. from the gateway:
    a device must not choose the address and scheme it is taken to have."""
    response = gateway.post(
        "/v1/fleet/get-run",
        content=b"x",
        headers={"x-forwarded-for": "10.9.8.7", "forwarded": "for=10.9.8.7;proto=https",
                 "x-forwarded-proto": "https", "x-forwarded-host": "evil", "x-real-ip": "1.2.3.4"},
    )  # fmt: skip

    assert response.status_code == 200
    seen = upstream.seen[-1].headers
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert not {"forwarded", "x-forwarded-host", "x-real-ip"} & set(seen)


def test_response_headers_are_relayed_as_their_bytes(
    gateway: httpx.Client, upstream: Upstream
) -> None:
    """A header value in UTF-8 came back as a plain-text 500 (re-encoded to latin-1) and its
    upstream connection was never given back."""
    response = gateway.post("/v1/fleet/get-run", content=b"x", headers={"x-answer-utf8": "1"})

    assert response.status_code == 200
    assert response.headers.raw[-1] == (b"x-name", "café ☕".encode())


def test_content_length_and_transfer_encoding_together_is_a_json_400(
    gateway: httpx.Client, upstream: Upstream
) -> None:
    """Two framings of one body (the shape of request smuggling) was a plain-text 500."""
    conn = _raw(
        str(gateway.base_url),
        "POST /v1/fleet/get-run HTTP/1.1\nHost: x\nContent-Length: 5\nTransfer-Encoding: chunked\n",
        b"5\r\nhello\r\n0\r\n\r\n",
    )

    status, headers, body = _answer(conn)

    assert status == 400
    assert headers["content-type"] == "application/json"
    assert "Transfer-Encoding" in json.loads(body)["error"]
    assert upstream.seen == []


def test_a_declared_length_over_the_limit_is_a_json_413_before_the_superlink(
    upstream: Upstream,
) -> None:
    """Refused on its Content-Length alone: no byte of it is waited for or forwarded."""
    with _gateway(upstream.port, GatewayLimits(max_body_bytes=MIB)) as url:
        conn = _raw(
            url, f"POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: {MIB + 1}\n"
        )
        status, headers, body = _answer(conn)

    assert status == 413
    assert headers["content-type"] == "application/json"
    assert str(MIB) in json.loads(body)["error"]
    assert upstream.seen == []


@pytest.mark.parametrize("buffer_bytes", [8 * MIB, 64 * 1024], ids=["read ahead", "streamed"])
def test_a_chunked_upload_is_counted_and_refused_past_the_limit(
    upstream: Upstream, buffer_bytes: int
) -> None:
    """No length up front: the gateway counts what it reads and stops at the limit, whether
    it reads the body before the SuperLink is asked or streams it on (the upstream sees a
    body cut short, never a whole one)."""
    limits = GatewayLimits(max_body_bytes=MIB, buffer_bytes=buffer_bytes)
    with _gateway(upstream.port, limits) as url:
        conn = _raw(
            url, "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"
        )
        block = b"\x01" * (256 * 1024)
        for chunk in [block] * 4 + [b"\x01"]:  # one byte past the limit, then it waits
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        status, _headers, body = _answer(conn)

        assert status == 413
        assert "body is over" in json.loads(body)["error"]
        assert upstream.seen == []
        # and the gateway serves the next call
        assert httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30).status_code == 200


def test_stalled_uploads_time_out_and_free_the_superlink_connections(upstream: Upstream) -> None:
    """Content-Length 1000000, 4 KiB (past the read-ahead: the rest streams), then silence,
    as many times as the gateway has connections to the SuperLink: each is a JSON 408 once
    idle, its upstream connection given back, and a normal call made while they hang goes
    through."""
    limits = GatewayLimits(
        upstream_connections=2, body_idle_s=1.0, body_deadline_s=30.0, buffer_bytes=1024
    )
    with _gateway(upstream.port, limits) as url:
        head = "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: 1000000\n"
        stalled = [_raw(url, head, b"ab" * 2048) for _ in range(2)]
        time.sleep(0.3)  # both hold an upstream connection now

        normal = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        answers = [_answer(conn) for conn in stalled]

    assert normal.status_code == 200, normal.text
    for status, headers, body in answers:
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert "stopped coming" in json.loads(body)["error"]
    assert [seen.path for seen in upstream.seen] == ["/v1/fleet/get-run"]


def test_a_slow_trickle_is_cut_at_the_body_deadline(upstream: Upstream) -> None:
    """A byte every half second never trips the idle timeout; the deadline ends it."""
    limits = GatewayLimits(body_idle_s=1.0, body_deadline_s=2.0)
    with _gateway(upstream.port, limits) as url:
        conn = _raw(url, "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: 100\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(20):
                conn.sendall(b"z")
                time.sleep(0.5)
        status, _headers, body = _answer(conn)

    assert status == 408
    assert "took over 2s" in json.loads(body)["error"]
    assert time.monotonic() - started < 8
    assert upstream.seen == []


def test_a_client_that_stops_reading_frees_its_superlink_connection(upstream: Upstream) -> None:
    """A 64 MiB answer to a client that reads none of it: at the relay deadline the
    upstream connection is given back, and the one connection the gateway has serves the
    next call."""
    limits = GatewayLimits(upstream_connections=1, response_deadline_s=1.0)
    with _gateway(upstream.port, limits) as url:
        conn = _raw(
            url,
            "POST /v1/fleet/pull-object HTTP/1.1\nHost: x\nContent-Length: 1\n"
            f"x-answer-size: {64 * MIB}\n",
            b"x",
        )
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        time.sleep(0.5)  # the answer has started and its relay is stuck on this client

        normal = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        conn.close()

    assert normal.status_code == 200, normal.text
