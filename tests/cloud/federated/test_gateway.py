"""The fleet gateway in front of a recording upstream (a real uvicorn server standing in for
the SuperLink): the Fleet API a SuperNode calls is forwarded with its body and its
authentication headers, streamed both ways; the Control and Runtime APIs and anything else
are refused in JSON and never reach the upstream; an upstream that is down or breaks off is
a JSON 503 or 502, not a reset connection."""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from cloud.embedded.processes import free_port
from cloud.federated.gateway import FLEET_PATHS, FleetGateway
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
        return Response(digest.hexdigest().encode(), media_type=PROTOBUF, status_code=200)

    return Starlette(routes=[Route("/{path:path}", record, methods=["GET", "POST"])])


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    seen: list[Seen] = []
    with serve_in_thread(_upstream_app(seen)) as url:
        yield Upstream(int(url.rsplit(":", 1)[1]), seen)


@contextmanager
def _gateway(upstream_port: int) -> Iterator[str]:
    gateway = FleetGateway(host="127.0.0.1", port=free_port(), upstream_port=upstream_port)
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
