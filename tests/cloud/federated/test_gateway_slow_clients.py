"""The fleet gateway against slow clients (from the review of d2def6d, where each of these
failed): a connection that never finishes its request head held a slot of limit_concurrency
for ever, and once all were held every device got uvicorn's plain-text 503; a body trickled
a byte at a time held a SuperLink connection until its deadline; a refusal sent without
reading the body left the connection open to drain an endless body; one address could take
every connection; a WebSocket upgrade got a plain-text 403."""

from __future__ import annotations

import json
import logging
import socket
import threading
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


def test_trickled_bodies_hold_no_superlink_connection(upstream: Upstream) -> None:
    """As many uploads trickling a byte at a time (never idle long enough to be cut) as the
    gateway has SuperLink connections: their bodies are read before a connection is taken,
    so a device's call made meanwhile goes through at once (it waited for a connection and
    got a 503)."""
    limits = GatewayLimits(upstream_connections=2, body_idle_s=5.0, body_deadline_s=60.0,
                           body_min_rate=0)  # fmt: skip
    with _gateway(upstream.port, limits) as url:
        head = "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: 1000\n"
        trickles = [_raw(url, head, b"a") for _ in range(2)]
        done = threading.Event()

        def trickle() -> None:
            while not done.wait(0.3):
                for conn in trickles:
                    conn.sendall(b"b")

        trickling = threading.Thread(target=trickle, daemon=True)
        trickling.start()
        try:
            time.sleep(0.5)
            started = time.monotonic()
            normal = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
            took = time.monotonic() - started
        finally:
            done.set()
            trickling.join()
            for conn in trickles:
                conn.close()

    assert normal.status_code == 200, normal.text
    assert took < 5
    assert [seen.path for seen in upstream.seen] == ["/v1/fleet/get-run"]


def test_a_body_slower_than_the_floor_is_a_408(upstream: Upstream) -> None:
    """A byte every 0.2 s, under a floor of 100 bytes/s: refused once the grace period is
    over, long before the deadline, and never forwarded."""
    limits = GatewayLimits(body_idle_s=5.0, body_deadline_s=60.0, body_min_rate=100,
                           body_grace_s=1.0)  # fmt: skip
    with _gateway(upstream.port, limits) as url:
        conn = _raw(url, "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: 100\n")
        started = time.monotonic()
        try:
            for _ in range(50):
                conn.sendall(b"z")
                time.sleep(0.2)
        except OSError:
            pass
        status, headers, body = _answer(conn)

    assert (status, headers["connection"]) == (408, "close")
    assert "slower than 100 bytes/s" in json.loads(body)["error"]
    assert time.monotonic() - started < 5
    assert upstream.seen == []


def test_a_chunked_upload_read_whole_is_sent_on_with_its_length(
    upstream: Upstream,
) -> None:
    with _gateway(upstream.port) as url:
        conn = _raw(
            url,
            "POST /v1/fleet/push-messages HTTP/1.1\nHost: x\nTransfer-Encoding: chunked\n"
            "Connection: close\n",
            b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n",
        )
        status, _headers, _body = _answer(conn)

    assert status == 200
    seen = upstream.seen[-1]
    assert (seen.size, seen.headers["content-length"]) == (7, "7")
    assert "transfer-encoding" not in seen.headers


def test_superlink_connections_all_busy_is_a_503_logged_as_such(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    """A body larger than the read-ahead streams, so it holds the one SuperLink connection
    while it stalls; the next call waits for a connection, gets a 503 and the log says the
    connections were busy (it said 'the SuperLink is out of reach: ' and nothing more)."""
    limits = GatewayLimits(upstream_connections=1, upstream_wait_s=0.5, buffer_bytes=1024,
                           body_idle_s=5.0, body_min_rate=0)  # fmt: skip
    caplog.set_level(logging.WARNING, logger="cloud.federated.gateway")
    with _gateway(upstream.port, limits) as url:
        streaming = _raw(
            url, "POST /v1/fleet/push-object HTTP/1.1\nHost: x\nContent-Length: 100000\n",
            b"z" * 4096,
        )  # fmt: skip
        time.sleep(0.3)

        busy = httpx.post(f"{url}/v1/fleet/get-run", content=b"x", timeout=30)
        streaming.close()

    assert busy.status_code == 503
    assert busy.headers["connection"] == "close"
    assert "busy" in busy.json()["error"]
    logged = [r.getMessage() for r in caplog.records]
    assert any("connections to the SuperLink stayed busy" in m for m in logged), logged
    assert not any("out of reach" in m for m in logged)


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
