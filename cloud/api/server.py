"""The HTTP protocol the API is served with: uvicorn's h11 server, answering in JSON too.

uvicorn refuses some requests before the app sees them, with a plain-text 400: a request
head larger than h11's buffer, or bytes that are not HTTP. This protocol keeps that buffer
(bounded memory per connection) and answers those as the app answers everything,
``{"error": ...}``: 414 when the request line alone overflows the buffer, 431 when the
headers do, 400 otherwise. Smaller heads reach the app, whose own limits are tighter
(``cloud.api.limits``). uvicorn's ``http="auto"`` would pick httptools where it is
installed, which has no head limit at all; passing ``http=JsonH11Protocol`` to
``uvicorn.Config`` makes the server the same wherever the cloud runs.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

__all__ = ["MAX_HEAD_BYTES", "JsonH11Protocol"]

MAX_HEAD_BYTES = 16 * 1024


def _refusal(buffered: bytes) -> tuple[int, str]:
    if len(buffered) > MAX_HEAD_BYTES:
        if b"\n" not in buffered:
            return 414, f"request line over {MAX_HEAD_BYTES} bytes"
        return 431, f"request head over {MAX_HEAD_BYTES} bytes"
    return 400, "invalid HTTP request"


class JsonH11Protocol(H11Protocol):
    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)

    def send_400_response(self, msg: str) -> None:
        # h11 keeps what it could not parse: its size and shape tell which limit was hit.
        status, message = _refusal(self.conn.trailing_data[0])
        body = json.dumps({"error": message}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=status, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
