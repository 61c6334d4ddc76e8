"""The fleet gateway against slow clients (from the review of d2def6d, where each of these
failed): a connection that never finishes its request head held a slot of limit_concurrency
for ever, and once all were held every device got uvicorn's plain-text 503; a refusal sent
without reading the body left the connection open to drain an endless body; one address
could take every connection; a WebSocket upgrade got a plain-text 403."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from cloud.federated.gateway import GatewayLimits
from tests.cloud.federated.test_gateway import (
    Seen,
    Upstream,
    _answer,
    _gateway,
    _raw,
    _upstream_app,
)
from tests.conftest import serve_in_thread


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    seen: list[Seen] = []
    with serve_in_thread(_upstream_app(seen)) as url:
        yield Upstream(int(url.rsplit(":", 1)[1]), seen)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def test_half_sent_heads_are_closed_and_do_not_lock_devices_out(upstream: Upstream) -> None:
    """Every slot taken by heads that never end (and sockets that send nothing): each is
    answered 408 (or, having asked nothing, closed) at the head timeout, and a device's call
    made after that goes through."""
    limits = GatewayLimits(max_concurrency=8, head_timeout_s=1.0)
    with _gateway(upstream.port, limits) as url:
        halves = [_raw(url, "POST /v1/fleet/get-run HTTP/1.1\nHost: x") for _ in range(6)]
        silent = [_connect(url) for _ in range(2)]
        time.sleep(3.0)
        response = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        answers = [_answer(conn) for conn in halves]
        unanswered = [conn.recv(65536) for conn in silent]
        for conn in silent:
            conn.close()

    assert response.status_code == 200, (response.status_code, response.text)
    for status, headers, body in answers:
        assert (status, headers["connection"]) == (408, "close")
        assert headers["content-type"] == "application/json"
        assert "request head" in json.loads(body)["error"]
    assert unanswered == [b"", b""]


def test_the_concurrency_limit_refusal_is_json(upstream: Upstream) -> None:
    limits = GatewayLimits(max_concurrency=2)
    with _gateway(upstream.port, limits) as url:
        held = [_connect(url) for _ in range(2)]
        time.sleep(0.2)
        response = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        for conn in held:
            conn.close()
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"


def test_a_refusal_without_reading_the_body_ends_the_connection(upstream: Upstream) -> None:
    """A 404 for a body never read: uvicorn then reads and drops that body for as long as it
    comes (each byte restarts its keep-alive timer), past every body limit of the gateway."""
    limits = GatewayLimits(body_idle_s=1.0, body_deadline_s=2.0)
    with _gateway(upstream.port, limits) as url:
        conn = _raw(
            url, "POST /v1/control/start-run HTTP/1.1\nHost: x\nContent-Length: 1000000000000\n"
        )
        conn.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += conn.recv(65536)
        closed = False
        started = time.monotonic()
        while time.monotonic() - started < 8 and not closed:
            try:
                conn.sendall(b"z" * 10)
                time.sleep(1.0)
            except OSError:
                closed = True
        conn.close()
    assert head.startswith(b"HTTP/1.1 404")
    assert b"connection: close" in head.lower()
    assert closed


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("GET /v1/fleet/get-run HTTP/1.1", 405),
        ("GET /v1/control/list-runs HTTP/1.1", 404),
    ],
)
def test_a_websocket_upgrade_is_an_ordinary_json_refusal(
    upstream: Upstream, head: str, status: int
) -> None:
    """The websockets library answered upgrades itself, with a plain-text 403."""
    with _gateway(upstream.port) as url:
        conn = _raw(
            url,
            f"{head}\nHost: x\nUpgrade: websocket\nConnection: Upgrade\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n",
        )
        answered, headers, body = _answer(conn)

    assert answered == status
    assert headers["content-type"] == "application/json"
    assert json.loads(body)["error"]
    assert upstream.seen == []


def test_one_address_cannot_take_every_connection(upstream: Upstream) -> None:
    limits = GatewayLimits(connections_per_address=3)
    with _gateway(upstream.port, limits) as url:
        held = [_connect(url) for _ in range(3)]
        status, headers, body = _answer(_connect(url))
        held.pop().close()
        time.sleep(0.2)
        after = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        for conn in held:
            conn.close()

    assert (status, headers["content-type"]) == (429, "application/json")
    assert "over 3 connections" in json.loads(body)["error"]
    assert after.status_code == 200
