"""One place maps errors to HTTP responses; every error body is ``{"error": "..."}``."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from shared.errors import EdgeFleetError

__all__ = ["install_error_handlers"]

_LOGGER = logging.getLogger(__name__)


def _body(message: str, status: int) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _edgefleet_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EdgeFleetError)
    return _body(exc.message, exc.status_code)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return _body("invalid request: " + "; ".join(parts), 422)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return _body(str(exc.detail), exc.status_code)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    _LOGGER.exception("unhandled error on %s %s", request.method, request.url.path)
    return _body("internal error", 500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(EdgeFleetError, _edgefleet_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
