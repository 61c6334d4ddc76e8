"""The HTTP protocol the API is served with: uvicorn's h11 server, answering in JSON too, and
bounding how long a client may take to ask.

uvicorn refuses some requests before the app sees them, with a plain-text 400: a request
head larger than h11's buffer, or bytes that are not HTTP. This protocol keeps that buffer
(bounded memory per connection) and answers those as the app answers everything,
``{"error": ...}``: 414 when the request line alone overflows the buffer, 431 when the
headers do, 400 otherwise. Smaller heads reach the app, whose own limits are tighter
(``cloud.api.limits``). uvicorn's ``http="auto"`` would pick httptools where it is
installed, which has no head limit at all; passing ``http=JsonH11Protocol`` to
``uvicorn.Config`` makes the server the same wherever the cloud runs.

uvicorn starts no clock on a connection until its first answer is sent, so a client that
sends half a request head (or nothing) holds its connection, and a slot of
``limit_concurrency``, for as long as it likes. Here a request head must be in within
``head_timeout_s`` of the connection (or of the last answer on it); past that the client
gets a JSON 408 and the connection ends. The same clock bounds how long the server reads
and drops the rest of a body the app answered without reading. The 503 uvicorn answers past
``limit_concurrency`` is JSON here too, and ends the connection. ``configured`` also caps
the connections one address may hold at once, for a server that faces the internet.
"""

from __future__ import annotations

import asyncio
import collections
import http
import json
from typing import Any, ClassVar, cast

import h11
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

__all__ = ["HEAD_TIMEOUT_S", "MAX_HEAD_BYTES", "JsonH11Protocol"]

MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 15.0
_CLOSE = (b"connection", b"close")


def _refusal(buffered: bytes) -> tuple[int, str]:
    if len(buffered) > MAX_HEAD_BYTES:
        if b"\n" not in buffered:
            return 414, f"request line over {MAX_HEAD_BYTES} bytes"
        return 431, f"request head over {MAX_HEAD_BYTES} bytes"
    return 400, "invalid HTTP request"


def _json_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        _CLOSE,
    ]


class JsonH11Protocol(H11Protocol):
    head_timeout_s: ClassVar[float] = HEAD_TIMEOUT_S
    # None: no cap. Counted per class: ``configured`` gives each server its own.
    connections_per_peer: ClassVar[int | None] = None
    _peers: ClassVar[collections.Counter[str]] = collections.Counter()

    @classmethod
    def configured(
        cls, *, head_timeout_s: float = HEAD_TIMEOUT_S, connections_per_peer: int | None = None
    ) -> type[JsonH11Protocol]:
        """The protocol with these limits, for one server's ``uvicorn.Config(http=...)``."""
        attributes: dict[str, object] = {
            "head_timeout_s": head_timeout_s,
            "connections_per_peer": connections_per_peer,
            "_peers": collections.Counter(),
        }
        return cast(type[JsonH11Protocol], type(cls.__name__, (cls,), attributes))

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        # uvicorn's own check answers in plain text and keeps the connection: ours instead.
        self.concurrency = self.limit_concurrency
        self.limit_concurrency = None
        self.served_app = self.app
        self.app = self._within_concurrency
        self.head_clock: asyncio.TimerHandle | None = None
        self.peer: str | None = None

    # The connection and the clock on its request heads.

    def connection_made(  # type: ignore[override]
        self, transport: asyncio.Transport
    ) -> None:
        super().connection_made(transport)
        peer = self.client[0] if self.client else None
        cap = self.connections_per_peer
        if cap is not None and peer is not None:
            if self._peers[peer] >= cap:
                # Not counted against the server's limits: it ends here.
                self.connections.discard(self)
                self._answer_and_close(429, f"over {cap} connections at once from {peer}")
                return
            self._peers[peer] += 1
            self.peer = peer
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._release()  # the connection is the WebSocket protocol's from here
        super().handle_websocket_upgrade(event)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY):
            self._stop_head_clock()  # a request head is in: the app answers it

    def on_response_complete(self) -> None:
        # Started before uvicorn looks at what is buffered: a pipelined head there stops it.
        # A body the app did not read is drained within this clock too, not for ever.
        if not self.transport.is_closing():
            self._start_head_clock()
        super().on_response_complete()

    def _start_head_clock(self) -> None:
        self._stop_head_clock()
        self.head_clock = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self.head_clock is not None:
            self.head_clock.cancel()
            self.head_clock = None

    def _release(self) -> None:
        self._stop_head_clock()
        if self.peer is not None:
            self._peers[self.peer] -= 1
            if self._peers[self.peer] <= 0:
                del self._peers[self.peer]
            self.peer = None

    def _head_timed_out(self) -> None:
        self.head_clock = None
        if self.transport.is_closing():
            return
        waiting = self.conn.our_state is h11.IDLE and self.conn.their_state is h11.IDLE
        if waiting and self.conn.trailing_data[0]:
            late = f"the request head was not in within {self.head_timeout_s:g}s"
            self._answer_and_close(408, late)
            return
        # Nothing asked (an idle connection), or the rest of an answered request's body:
        # there is no request to answer.
        self.transport.close()

    # Answers from the server itself.

    def send_400_response(self, msg: str) -> None:
        # h11 keeps what it could not parse: its size and shape tell which limit was hit.
        self._answer_and_close(*_refusal(self.conn.trailing_data[0]))

    def _answer_and_close(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        head = h11.Response(
            status_code=status,
            headers=_json_headers(body),
            reason=http.HTTPStatus(status).phrase.encode(),
        )
        for event in (head, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()

    async def _within_concurrency(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        # As uvicorn counts, but from inside the request's task, which is in ``tasks``.
        limit = self.concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) > limit):
            self.logger.warning("Exceeded concurrency limit.")
            body = json.dumps({"error": "the server is busy; try again later"}).encode()
            headers = _json_headers(body)
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await self.served_app(scope, receive, send)

    def _unsupported_upgrade_warning(self) -> None:
        # A server given ws="none" means it: an upgrade is an ordinary request to the app,
        # not two warnings per request for anyone to fill the log with.
        self.logger.debug("upgrade request answered as plain HTTP")
