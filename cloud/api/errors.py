"""One place maps errors to HTTP responses; every error body is ``{"error": "..."}``.

Errors raised on purpose map by their status; validation errors name the field; anything
else that answers with an error status and another media type (Starlette's Range errors,
plain-text fallbacks) is rewritten to the same JSON shape on its way out. No message
carries a path of the server's filesystem.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import EdgeFleetError

__all__ = ["JsonErrorBodies", "PathScrubber", "install_error_handlers"]

_LOGGER = logging.getLogger(__name__)
_MAX_MESSAGE = 500


class PathScrubber:
    """Replaces any path under the given folders (the data dir, the temp dir) in a message."""

    def __init__(self, roots: Iterable[Path]) -> None:
        names = {str(p) for root in roots for p in (root, root.resolve())}
        names = {n for n in names if n.startswith("/") and n != "/"}
        alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        # A root counts only as a whole path or its head: not in "a/tmp/b", not as "/tmpfoo".
        pattern = f"(?<![\\w./-])(?:{alternatives})(?:/[^\\s'\",;:)]*)?(?![\\w.-])"
        self._pattern = re.compile(pattern) if alternatives else None

    def __call__(self, message: str) -> str:
        return self._pattern.sub("<server path>", message) if self._pattern else message


def _roots(app: FastAPI) -> list[Path]:
    roots = [Path(tempfile.gettempdir())]
    context = getattr(app.state, "context", None)
    if context is not None:
        roots.append(context.settings.data_dir)
    return roots


def _body(
    request: Request, message: str, status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    scrub: PathScrubber = request.app.state.scrub_paths
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": scrub(message)[:_MAX_MESSAGE]}, status, headers=extra)


async def _edgefleet_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EdgeFleetError)
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return _body(request, exc.message, exc.status_code, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _body(request, "invalid request: " + "; ".join(parts), 422)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    # Its headers matter to the client: ``Allow`` on a 405, for one.
    return _body(request, str(exc.detail), exc.status_code, exc.headers)


async def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
    # A number past what the driver binds (SQLite's int64) that no schema bounded: the
    # request's fault, answered on a connection that stays open.
    _LOGGER.warning("number out of range on %s %s: %s", request.method, request.url.path, exc)
    return _body(request, "a number in the request is out of range", 422)


async def _unstorable(request: Request, exc: Exception) -> JSONResponse:
    # The database refused a value no schema caught (PostgreSQL: an int4 overflow, a NUL in
    # text, NaN in JSON); its words name columns and SQL, so only the kind is answered.
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    _LOGGER.warning("value refused by the database on %s %s: %s", request.method,
                    request.url.path, first)  # fmt: skip
    return _body(request, "a value in the request cannot be stored (out of range or invalid)", 422)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _LOGGER.exception("unhandled error on %s %s", request.method, request.url.path)
    # Starlette re-raises the error once this is sent, and the server then drops the
    # connection: say so, or a client reusing it has its next request reset.
    return _body(request, "internal error", 500, {"Connection": "close"})


def install_error_handlers(app: FastAPI) -> None:
    app.state.scrub_paths = PathScrubber(_roots(app))
    app.add_exception_handler(EdgeFleetError, _edgefleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(OverflowError, _out_of_range)
    app.add_exception_handler(DataError, _unstorable)
    app.add_exception_handler(Exception, _unexpected)


class JsonErrorBodies:
    """Rewrites an error response of another media type to ``{"error": <its text>}``,
    keeping its status and headers (``Content-Range`` on a 416, ``Allow`` on a 405)."""

    def __init__(self, app: ASGIApp, *, scrub: PathScrubber) -> None:
        self.app = app
        self.scrub = scrub

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        text = bytearray()

        async def rewriting_send(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                is_json = headers.get("content-type", "").startswith("application/json")
                if message["status"] >= 400 and not is_json:
                    start = message
                    return
            elif start is not None and message["type"] == "http.response.body":
                if len(text) <= _MAX_MESSAGE:
                    text.extend(message.get("body", b"")[: _MAX_MESSAGE + 1])
                if not message.get("more_body", False):
                    await _send_json(send, start, self._message(start["status"], bytes(text)))
                return
            await send(message)

        await self.app(scope, receive, rewriting_send)

    def _message(self, status: int, text: bytes) -> str:
        message = text.decode("utf-8", "replace").strip()
        if not message:
            try:
                message = HTTPStatus(status).phrase
            except ValueError:
                message = f"HTTP {status}"
        return self.scrub(message)[:_MAX_MESSAGE]


async def _send_json(send: Send, start: Message, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = MutableHeaders(raw=list(start.get("headers", [])))
    headers["content-type"] = "application/json"
    headers["content-length"] = str(len(body))
    await send({"type": "http.response.start", "status": start["status"], "headers": headers.raw})
    await send({"type": "http.response.body", "body": body})
