"""The cloud's HTTP protocol (``cloud.api.server.JsonH11Protocol``) against slow clients: a
request head must be in within the head timeout, from the connection or from the last answer
on it, or the client gets a JSON 408 and the connection ends; the rest of a body the app
answered without reading is not drained for ever; uvicorn's concurrency refusal is JSON; one
address may be capped. A request whose head is in is the app's, however long it takes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from cloud.api.server import JsonH11Protocol
from tests.security.helpers import serve

HEAD_TIMEOUT_S = 1.0


async def _unread(request: Request) -> JSONResponse:
    return JSONResponse({"read": False})


async def _read(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def _slow(request: Request) -> JSONResponse:
    await asyncio.sleep(3 * HEAD_TIMEOUT_S)
    return JSONResponse({"slow": True})


APP = Starlette(
    routes=[
        Route("/unread", _unread, methods=["POST"]),
        Route("/read", _read, methods=["POST"]),
        Route("/slow", _slow, methods=["GET"]),
    ]
)


@pytest.fixture
def url() -> Iterator[str]:
    protocol = JsonH11Protocol.configured(head_timeout_s=HEAD_TIMEOUT_S)
    with serve(APP, http=protocol) as served:
        yield served


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _read_answer(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One answer with a Content-Length; the connection stays as it is."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        body += conn.recv(65536)
    return int(lines[0].split()[1]), headers, body


def _closed_within(conn: socket.socket, seconds: float) -> bool:
    """Whether the server ends the connection within ``seconds`` (what it sends is dropped)."""
    conn.settimeout(seconds)
    try:
        while conn.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_a_half_sent_head_is_a_json_408_and_the_connection_ends(url: str) -> None:
    conn = _connect(url)
    conn.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Le")  # and nothing more
    started = time.monotonic()

    status, headers, body = _read_answer(conn)

    assert status == 408
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert "1s" in json.loads(body)["error"]
    assert HEAD_TIMEOUT_S * 0.8 <= time.monotonic() - started < HEAD_TIMEOUT_S + 3
    assert _closed_within(conn, 2)


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(url: str) -> None:
    conn = _connect(url)
    conn.settimeout(HEAD_TIMEOUT_S + 3)

    assert conn.recv(65536) == b""


def test_the_head_clock_starts_again_after_each_answer(url: str) -> None:
    """A keep-alive connection that answered once and then gets half a head: uvicorn's
    keep-alive timer stops at the first byte, the head clock does not."""
    conn = _connect(url)
    conn.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nab")
    assert _read_answer(conn)[0] == 200
    conn.sendall(b"POST /read HTTP/1.1\r\nHost: x\r\n")

    status, headers, _body = _read_answer(conn)

    assert (status, headers["connection"]) == (408, "close")


def test_a_body_the_app_did_not_read_is_not_drained_for_ever(url: str) -> None:
    """Answered without reading: uvicorn reads and drops the rest of the declared body, and
    each byte stopped its keep-alive timer, so a trickle of an endless body held the
    connection past every limit. Now the drain ends with the head clock."""
    conn = _connect(url)
    conn.sendall(b"POST /unread HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
    assert _read_answer(conn)[0] == 200
    started = time.monotonic()
    closed = False
    while not closed and time.monotonic() - started < HEAD_TIMEOUT_S + 5:
        try:
            conn.sendall(b"z" * 10)
        except OSError:
            closed = True
        time.sleep(0.2)

    assert closed


def test_a_request_whose_head_is_in_is_the_apps_however_long(url: str) -> None:
    """An app slower than the head timeout, and a body slower than it: neither is cut."""
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/slow").json() == {"slow": True}

        def body() -> Iterator[bytes]:
            for _ in range(3):
                time.sleep(HEAD_TIMEOUT_S)
                yield b"abc"

        assert client.post("/read", content=body()).json() == {"size": 9}


def test_the_concurrency_limit_is_a_json_503_that_ends_the_connection() -> None:
    protocol = JsonH11Protocol.configured(head_timeout_s=30)
    with serve(APP, http=protocol, limit_concurrency=2) as url:
        held = [_connect(url) for _ in range(2)]
        time.sleep(0.2)

        response = httpx.post(f"{url}/read", content=b"x", timeout=10)
        for conn in held:
            conn.close()
        after = httpx.post(f"{url}/read", content=b"x", timeout=10)

    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert response.headers["connection"] == "close"
    assert "busy" in response.json()["error"]
    assert after.json() == {"size": 1}


def test_connections_from_one_address_are_capped() -> None:
    protocol = JsonH11Protocol.configured(connections_per_peer=2)
    with serve(APP, http=protocol) as url:
        held = [_connect(url) for _ in range(2)]
        over = _connect(url)

        status, headers, body = _read_answer(over)
        closed = _closed_within(over, 2)
        held[0].close()
        time.sleep(0.2)
        after = httpx.post(f"{url}/read", content=b"x", timeout=10)
        held[1].close()

    assert (status, headers["content-type"]) == (429, "application/json")
    assert "127.0.0.1" in json.loads(body)["error"]
    assert closed
    assert after.json() == {"size": 1}
