"""The fleet gateway: the one federated port devices reach. It forwards the Fleet API calls a
SuperNode makes to the SuperLink on loopback and answers everything else itself.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port, and its Control API
has no authentication without Flower's enterprise plugin: whoever reaches that port can start
a run with a Flower App of their own, i.e. run code on the cloud. So the SuperLink listens on
127.0.0.1 only, and devices get this gateway instead, which knows the Fleet API by an
allow-list (the paths of ``flwr.supernode.fleet_http_client``, all POST) and sends each
request upstream to the allowed path alone (no query string, no raw spelling of it). Bodies
stream both ways; SuperNode authentication (signed ``flwr-*`` headers, checked by the
SuperLink) passes through untouched. A SuperLink that is down is a JSON 503,
one that fails mid-call a JSON 502.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from cloud.api.server import JsonH11Protocol
from shared.errors import ServiceUnavailable

__all__ = ["FLEET_PATHS", "FleetGateway", "create_gateway_app"]

_LOGGER = logging.getLogger(__name__)

# What `flower-supernode` 1.41 calls (flwr/supernode/fleet_http_client.py), nothing more.
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
# Per connection (RFC 9110 7.6.1), or set by the server that answers.
_REQUEST_DROP = frozenset(
    {"host", "connection", "keep-alive", "proxy-connection", "te", "trailer",
     "transfer-encoding", "upgrade", "proxy-authorization", "proxy-authenticate"}
)  # fmt: skip
_RESPONSE_DROP = _REQUEST_DROP | {"server", "date"}
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _named_by_connection(value: str) -> frozenset[str]:
    """The headers a Connection header says are for this hop only."""
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


async def _forward(request: Request) -> Response:
    # The upstream URL is the allowed path alone: no query, no raw spelling of it.
    allowed = request.url.path
    if allowed not in FLEET_PATHS:
        return _error(404, "not found: this port serves only Flower's Fleet API")
    if request.method != "POST":
        return _error(405, f"{request.method} not allowed on {allowed}", {"allow": "POST"})
    client: httpx.AsyncClient = request.app.state.upstream
    drop = _REQUEST_DROP | _named_by_connection(request.headers.get("connection", ""))
    headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in drop]
    outgoing = client.build_request("POST", allowed, headers=headers, content=request.stream())
    try:
        answer = await client.send(outgoing, stream=True)
    except ClientDisconnect:
        return _error(400, "the request body ended early")
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
        _LOGGER.warning("fleet gateway: the SuperLink is out of reach: %s", exc)
        return _error(503, "the SuperLink is not available; try again later")
    except httpx.HTTPError as exc:
        _LOGGER.warning("fleet gateway: %s to the SuperLink failed: %s", allowed, exc)
        return _error(502, "the SuperLink did not answer")
    drop = _RESPONSE_DROP | _named_by_connection(answer.headers.get("connection", ""))
    response = StreamingResponse(
        _relay(answer, allowed),
        status_code=answer.status_code,
        background=BackgroundTask(answer.aclose),
    )
    # Every header as sent, repeated ones included (a dict would keep one of each).
    response.raw_headers = [
        (name.encode("latin-1"), value.encode("latin-1"))
        for name, value in answer.headers.multi_items()
        if name.lower() not in drop
    ]
    return response


async def _relay(answer: httpx.Response, path: str) -> AsyncIterator[bytes]:
    """The answer's bytes as they come (still encoded, as the headers say)."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        # The status line is sent: all that is left is to end the connection early.
        _LOGGER.warning("fleet gateway: the SuperLink's answer to %s broke off: %s", path, exc)
        raise


def create_gateway_app(upstream: str, *, verify: ssl.SSLContext | bool = True) -> Starlette:
    """The gateway in front of the SuperLink at ``upstream`` (``http(s)://host:port``)."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=upstream,
            verify=verify,
            # A pull or push of a large object may take a while; connecting must not.
            timeout=httpx.Timeout(120.0, connect=5.0, pool=10.0),
            limits=httpx.Limits(max_connections=512, max_keepalive_connections=64),
            follow_redirects=False,
            trust_env=False,  # loopback: never through a proxy the environment names
        ) as client:
            app.state.upstream = client
            yield

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(
        routes=[Route("/{path:path}", _forward, methods=methods)],
        lifespan=lifespan,
    )


class FleetGateway:
    """The gateway served by uvicorn in a thread of the process that runs the SuperLink."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        upstream_port: int,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        ca_file: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port
        scheme = "http"
        verify: ssl.SSLContext | bool = True
        if certfile is not None:
            # The SuperLink keeps TLS on loopback (Flower refuses SuperNode authentication
            # without it); its certificate names 127.0.0.1, as SuperExec already needs.
            scheme = "https"
            verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        app = create_gateway_app(f"{scheme}://127.0.0.1:{upstream_port}", verify=verify)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=port,
                ssl_certfile=str(certfile) if certfile else None,
                ssl_keyfile=str(keyfile) if keyfile else None,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=5,
                http=JsonH11Protocol,  # a bounded request head, refused in JSON
            )
        )
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        thread = threading.Thread(target=self._serve, name="fleet-gateway", daemon=True)
        self.thread = thread
        thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:
            if not thread.is_alive():
                raise ServiceUnavailable(
                    f"the fleet gateway could not listen on {self.host}:{self.port} "
                    "(taken? set EDGEFLEET_FEDERATED_PORT)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceUnavailable(
                    f"the fleet gateway did not start within {_START_TIMEOUT_S:g}s"
                )
            time.sleep(0.02)

    def _serve(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn's way of saying it could not bind; start() reports it
            _LOGGER.debug("the fleet gateway on %s:%d exited", self.host, self.port)

    def stop(self) -> None:
        thread = self.thread
        if thread is None:
            return
        self.server.should_exit = True
        thread.join(_STOP_TIMEOUT_S)
        if thread.is_alive():
            _LOGGER.warning("the fleet gateway did not stop within %gs", _STOP_TIMEOUT_S)
        self.thread = None
