"""The local API's HTTP/1.1 server: stdlib asyncio for connections, a fixed thread pool for
handlers, and a bound on everything a client can hold (connections, bytes, time, threads)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import re
import select
import socket
import threading
from asyncio import trsock
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, SupportsIndex

__all__ = ["HttpServer", "Limits", "Request", "Response", "error_response", "json_response"]

_LOGGER = logging.getLogger(__name__)
# One request line or header line, and the whole head: what http.server allows too.
_MAX_LINE = 64 * 1024
_MAX_HEAD = 64 * 1024
_MAX_HEADERS = 100
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_METHOD = re.compile(r"[A-Z]+")
_VERSION = re.compile(r"HTTP/\d\.\d")
# Longest time a refused client is read (and ignored) before the socket is closed: closing
# with unread bytes makes the kernel send a reset, which can destroy the answer in flight.
_LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class Limits:
    workers: int
    max_connections: int
    max_request_bytes: int
    read_timeout_s: float


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})


def json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload).encode())


def error_response(status: int, message: str) -> Response:
    return json_response(status, {"error": message})


class _Refused(Exception):
    """A request answered with an error before it reached a handler; the connection closes."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Head:
    method: str
    target: str
    keep_alive: bool
    headers: dict[str, str]
    length: int
    expect_continue: bool


class _Budget:
    """Bytes of request bodies held at once (read, queued or being handled): many slow or
    large requests wait here instead of growing the process without bound."""

    def __init__(self, total: int) -> None:
        self._free = total
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def take(self, amount: int) -> None:
        while self._free < amount:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self._free -= amount

    def give(self, amount: int) -> None:
        self._free += amount
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


class _Reader(asyncio.StreamReader):
    """A stream that says whether bytes arrived since ``fed`` was cleared: a connection
    whose next request is already in its buffer must not be closed as idle."""

    fed = False

    def feed_data(self, data: Iterable[SupportsIndex]) -> None:
        self.fed = True
        super().feed_data(data)


async def _line(reader: asyncio.StreamReader, status: int, what: str) -> bytes:
    try:
        line = await reader.readline()
    except ValueError:  # longer than the reader's limit
        raise _Refused(status, f"{what} longer than {_MAX_LINE} bytes") from None
    if not line.endswith(b"\n"):
        raise asyncio.IncompleteReadError(line, None)  # the client went away mid-line
    return line


def _content_length(headers: dict[str, str], limit: int) -> int:
    if "transfer-encoding" in headers:
        raise _Refused(501, "Transfer-Encoding is not supported: send a Content-Length")
    raw = headers.get("content-length", "0")
    if not (raw.isascii() and raw.isdigit()):
        raise _Refused(400, f"bad Content-Length {raw[:40]!r}")
    # Compared as text first: int() of a 64 KiB digit string is itself refused by Python.
    if len(raw.lstrip("0")) > len(str(limit)) or int(raw) > limit:
        raise _Refused(
            413, f"a request body of {raw[:40]} bytes exceeds the limit of {limit} bytes"
        )
    return int(raw)


async def _read_head(reader: asyncio.StreamReader, first: bytes, limits: Limits) -> _Head:
    line = first + await _line(reader, 414, "request line")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ")
    if len(parts) != 3 or not _METHOD.fullmatch(parts[0]) or not parts[1].startswith("/"):
        raise _Refused(400, "malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _Refused(505 if _VERSION.fullmatch(version) else 400, f"unsupported {version[:16]}")
    headers: dict[str, str] = {}
    size = len(line)
    for _ in range(_MAX_HEADERS + 1):
        raw = await _line(reader, 431, "header line")
        size += len(raw)
        if size > _MAX_HEAD:
            raise _Refused(431, f"request head longer than {_MAX_HEAD} bytes")
        if raw in (b"\r\n", b"\n"):
            break
        name, colon, value = raw.decode("latin-1").rstrip("\r\n").partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise _Refused(400, "malformed header line")
        key, value = name.lower(), value.strip(" \t")
        if key == "content-length" and headers.get(key, value) != value:
            raise _Refused(400, "conflicting Content-Length headers")
        repeated = key in headers and key != "content-length"
        headers[key] = f"{headers[key]}, {value}" if repeated else value
    else:
        raise _Refused(431, f"more than {_MAX_HEADERS} header lines")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    return _Head(
        method=method,
        target=target,
        keep_alive=keep_alive,
        headers=headers,
        length=_content_length(headers, limits.max_request_bytes),
        expect_continue=version == "HTTP/1.1"
        and headers.get("expect", "").lower() == "100-continue",
    )


def _readable(sock: socket.socket | trsock.TransportSocket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _encode(response: Response, *, keep_alive: bool, head_only: bool) -> bytes:
    try:
        reason = HTTPStatus(response.status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {response.status} {reason}"]
    lines += [f"{key}: {value}" for key, value in response.headers.items()]
    lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


class HttpServer:
    """Serves ``handler`` (run on one of ``limits.workers`` threads, one request at a time)
    on ``host:port``; the socket is bound here, so ``address`` is known before ``start``."""

    def __init__(
        self, host: str, port: int, handler: Callable[[Request], Response], limits: Limits
    ) -> None:
        self._handler = handler
        self.limits = limits
        # A bounded backlog: past max_connections, new clients wait in the kernel's queue.
        self._sock = socket.create_server((host, port), backlog=limits.max_connections)
        self._sock.setblocking(False)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="local-api-worker")
        self._thread = threading.Thread(target=self._run, name="local-api", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        # Bound to the loop on first use (Python >= 3.10), so made here without one.
        self._stop = asyncio.Event()
        self._room = asyncio.Event()
        self._budget = _Budget(limits.max_request_bytes * limits.workers)
        self._connections: set[asyncio.Task[None]] = set()
        self._idle: dict[asyncio.StreamWriter, _Reader] = {}  # oldest first

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop has just ended
                loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the event loop's thread ---------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        accepting = asyncio.create_task(self._accept())
        self._ready.set()
        await self._stop.wait()
        accepting.cancel()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(accepting, *self._connections, return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._make_room()
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. out of file descriptors: try again shortly
                _LOGGER.warning("local API: accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)

    async def _make_room(self) -> None:
        """At the connection limit, new clients wait in the kernel's backlog until a
        connection ends; while one waits, the connection idle the longest is closed for it."""
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()

        def knocked() -> None:
            loop.remove_reader(fd)
            self._room.set()

        while len(self._connections) >= self.limits.max_connections:
            self._room.clear()
            if self._idle and not (_readable(self._sock) and self._close_idle()):
                loop.add_reader(fd, knocked)
            try:
                await self._room.wait()  # a connection ended or went idle, or a client knocked
            finally:
                loop.remove_reader(fd)

    def _close_idle(self) -> bool:
        for writer, reader in self._idle.items():
            sock = writer.get_extra_info("socket")
            # A request already arriving would be lost (and the close would be a reset if
            # its bytes sat unread in the kernel): that connection is not idle.
            if not reader.fed and sock is not None and not _readable(sock):
                del self._idle[writer]
                writer.close()
                return True
        return False

    async def _serve(self, conn: socket.socket) -> None:
        task = asyncio.current_task()
        writer: asyncio.StreamWriter | None = None
        try:
            # One buffered write per response and no Nagle: small keep-alive responses
            # written piecewise otherwise wait ~40 ms on the client's delayed ACK.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            loop = asyncio.get_running_loop()
            reader = _Reader(_MAX_LINE, loop)
            protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass  # the client went away, or stopped reading: nobody is left to answer
        except Exception:
            _LOGGER.exception("local API: connection failed")
        finally:
            if writer is not None:
                self._idle.pop(writer, None)
                if writer.transport.get_write_buffer_size():
                    # A client that stopped reading: close() would wait for it forever.
                    writer.transport.abort()
                else:
                    writer.close()
            else:
                conn.close()
            if task is not None:
                self._connections.discard(task)
            self._room.set()

    async def _exchange(self, reader: _Reader, writer: asyncio.StreamWriter) -> bool:
        """One request and its answer; whether the connection stays open."""
        timeout = self.limits.read_timeout_s
        reader.fed = False
        self._idle[writer] = reader
        self._room.set()  # an idle connection can make room for a waiting client
        try:
            async with asyncio.timeout(timeout):
                first = await reader.read(1)
        except TimeoutError:
            return False  # idle for too long: nothing was asked, nothing to answer
        finally:
            self._idle.pop(writer, None)
        if not first:
            return False
        try:
            async with asyncio.timeout(timeout):
                head = await _read_head(reader, first, self.limits)
        except TimeoutError:
            await self._refuse(reader, writer, 408, f"no complete request head in {timeout} s")
            return False
        except _Refused as exc:
            await self._refuse(reader, writer, exc.status, exc.message)
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._budget.take(head.length)
        except TimeoutError:
            await self._refuse(reader, writer, 503, "busy: too many request bytes in flight")
            return False
        response: Response | None = None
        try:
            if head.expect_continue and head.length:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    body = await reader.readexactly(head.length)
                path, _, query = head.target.partition("?")
                request = Request(head.method, path, query, head.headers, body)
                loop = asyncio.get_running_loop()
                response = await loop.run_in_executor(self._pool, self._call, request)
        finally:
            self._budget.give(head.length)
        if response is None:
            message = f"the {head.length}-byte body did not arrive within {timeout} s"
            await self._refuse(reader, writer, 408, message)
            return False
        keep_alive = head.keep_alive and not self._stop.is_set()
        await self._write(
            writer, _encode(response, keep_alive=keep_alive, head_only=head.method == "HEAD")
        )
        return keep_alive

    def _call(self, request: Request) -> Response:
        """Whatever goes wrong inside, the client gets a JSON 500 (the details stay in the
        log) instead of a reset connection, and the server goes on."""
        try:
            return self._handler(request)
        except Exception:
            _LOGGER.exception("local API: %s %s failed", request.method, request.path)
            return error_response(500, "internal error")

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        async with asyncio.timeout(self.limits.read_timeout_s):
            await writer.drain()

    async def _refuse(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, message: str
    ) -> None:
        """Answer ``status`` and close; what the client still sends is read and dropped for
        a moment so that the close does not reset the connection under the answer."""
        _LOGGER.debug("local API: refused (%d): %s", status, message)
        response = error_response(status, message)
        await self._write(writer, _encode(response, keep_alive=False, head_only=False))
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(min(_LINGER_S, self.limits.read_timeout_s)):
                while await reader.read(65536):
                    pass
