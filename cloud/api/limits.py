"""Request size limits: bodies (413, declared or streamed), request targets (414), headers (431).

The target and header limits sit below h11's 16 KiB head buffer, so every server uvicorn
may pick (h11, httptools) passes such requests to the app and they get a JSON answer here;
a head past that buffer is refused by the server itself (see ``cloud.api.server``)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import PayloadTooLarge

__all__ = ["MAX_HEADER_BYTES", "MAX_TARGET_BYTES", "BodySizeLimit", "HeadSizeLimit"]

MAX_TARGET_BYTES = 4 * 1024
MAX_HEADER_BYTES = 8 * 1024


class BodySizeLimit:
    """``limit_for(path)`` gives the byte limit; over it the answer is 413."""

    def __init__(self, app: ASGIApp, *, default: int, uploads: int) -> None:
        self.app = app
        self.default = default
        self.uploads = uploads

    def _limit(self, path: str) -> int:
        uploads = ("/versions", "/quantize", "/prune", "/fp16", "/distill")  # model or dataset
        return self.uploads if path.endswith(uploads) else self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > limit:
                    await _reject(send, 413, f"request body over the limit of {limit} bytes")
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body over the limit of {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


class HeadSizeLimit:
    """414 for a request target (path and query) over ``MAX_TARGET_BYTES``, 431 for headers
    over ``MAX_HEADER_BYTES`` in all; the connection closes after either."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            target = len(scope.get("raw_path") or scope["path"].encode()) + len(
                scope.get("query_string", b"")
            )
            if target > MAX_TARGET_BYTES:
                await _reject(send, 414, f"request target over {MAX_TARGET_BYTES} bytes")
                return
            headers = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", []))
            if headers > MAX_HEADER_BYTES:
                await _reject(send, 431, f"request headers over {MAX_HEADER_BYTES} bytes")
                return
        await self.app(scope, receive, send)


async def _reject(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
