"""The fleet gateway: the one federated port devices reach. It forwards the Fleet API calls a
SuperNode makes to the SuperLink on loopback and answers everything else itself.

Flower 1.41 serves its Fleet, Control and Runtime APIs on one HTTP port, and its Control API
has no authentication without Flower's enterprise plugin: whoever reaches that port can start
a run with a Flower App of their own, i.e. run code on the cloud. So the SuperLink listens on
127.0.0.1 only, and devices get this gateway instead, which knows the Fleet API by an
allow-list (the paths of ``flwr.supernode.fleet_http_client``, all POST) and sends each
request upstream to the allowed path alone (no query string, no raw spelling of it).
SuperNode authentication (signed ``flwr-*`` headers, checked by the SuperLink) passes
through untouched. A SuperLink that is down or busy is a JSON 503, one that fails mid-call a
JSON 502; every refusal ends the connection.

The port faces the internet, so no client may hold it for long: a request head must be in
within a timeout (``cloud.api.server``), a body keep a minimum rate, and a body is read
before a SuperLink connection is taken (``gateway_body``; only a large one streams), so the
SuperLink's connections go to requests that are ready. Answers stream back.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from cloud.api.server import HEAD_TIMEOUT_S, JsonH11Protocol
from cloud.federated.gateway_body import (
    BodyBudget,
    BodyLimits,
    BodyReader,
    BodyRefused,
    Buffered,
    read_ahead,
)
from shared.errors import ServiceUnavailable

__all__ = ["FLEET_PATHS", "FleetGateway", "GatewayLimits", "create_gateway_app"]

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
# Who the client is and how it came in: the gateway says so itself (the SuperLink's uvicorn
# believes these from 127.0.0.1, i.e. from the gateway), never the client.
_FORWARDING = frozenset(
    {"forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
     "x-forwarded-port", "x-real-ip"}
)  # fmt: skip
_RESPONSE_DROP = _REQUEST_DROP | {"server", "date"}
_START_TIMEOUT_S = 15.0
_STOP_TIMEOUT_S = 10.0
MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """What one client may hold of the gateway. Flower pushes a model's arrays as objects of
    at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE), one per push-object call, and
    messages and records without their arrays; 256 MiB leaves ample headroom."""

    max_body_bytes: int = 256 * MIB
    # A request head not all in this long after the connection (or the last answer on it)
    # is a 408, and the connection ends.
    head_timeout_s: float = HEAD_TIMEOUT_S
    # Connections one address may hold at once (None: no cap); more are refused (429).
    connections_per_address: int | None = 256
    # A request body that sends nothing for this long, or is not all in by the deadline,
    # or whose average rate is below the floor once the grace period is over, is refused
    # (408).
    body_idle_s: float = 30.0
    body_deadline_s: float = 600.0
    body_min_rate: float = 1024.0  # bytes/s; 0: no floor
    body_grace_s: float = 10.0
    # A body up to this size is read whole before a SuperLink connection is taken, while
    # the bodies read so far (all requests together) stay under the budget; a larger one
    # streams on past that.
    buffer_bytes: int = 8 * MIB
    buffer_budget_bytes: int = 256 * MIB
    # The answer relayed to a client that stops reading ends at this deadline.
    response_deadline_s: float = 600.0
    # Connections to the SuperLink, how long a request waits for one of them, and
    # connections plus requests the gateway's uvicorn takes before it answers 503 (bounds
    # sockets and tasks, however many clients stall).
    upstream_connections: int = 512
    upstream_wait_s: float = 10.0
    max_concurrency: int = 1024

    @property
    def body(self) -> BodyLimits:
        return BodyLimits(
            max_bytes=self.max_body_bytes,
            idle_s=self.body_idle_s,
            deadline_s=self.body_deadline_s,
            min_rate=self.body_min_rate,
            grace_s=self.body_grace_s,
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # The request may not have been read to its end: the connection ends with the answer
    # (uvicorn would otherwise read and drop the rest of the body, however long it is).
    return JSONResponse(
        {"error": message}, status_code=status, headers={**(headers or {}), "connection": "close"}
    )


def _named_by_connection(value: str) -> frozenset[str]:
    """The headers a Connection header says are for this hop only."""
    return frozenset(name.strip().lower() for name in value.split(",") if name.strip())


def _request_headers(request: Request) -> list[tuple[bytes, bytes]]:
    drop = _REQUEST_DROP | _FORWARDING | _named_by_connection(request.headers.get("connection", ""))
    headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in drop]
    peer = request.client.host if request.client else "unknown"
    headers.append((b"x-forwarded-for", peer.encode("latin-1")))
    headers.append((b"x-forwarded-proto", request.url.scheme.encode("latin-1")))
    return headers


def _declared_length(request: Request, limits: GatewayLimits) -> JSONResponse | None:
    """A refusal for a body whose framing or declared size is not acceptable, else None."""
    lengths = request.headers.getlist("content-length")
    if lengths and "transfer-encoding" in request.headers:
        # Two framings (RFC 9112 6.3): the shape of request smuggling; no client needs it.
        return _error(400, "Content-Length and Transfer-Encoding together")
    if not lengths:
        return None
    if len(set(lengths)) != 1 or not lengths[0].isdigit():
        return _error(400, "invalid Content-Length")
    if int(lengths[0]) > limits.max_body_bytes:
        return _error(413, f"the request body is over {limits.max_body_bytes} bytes")
    return None


async def _forward(request: Request) -> Response:
    # The upstream URL is the allowed path alone: no query, no raw spelling of it.
    allowed = request.url.path
    if allowed not in FLEET_PATHS:
        return _error(404, "not found: this port serves only Flower's Fleet API")
    if request.method != "POST":
        return _error(405, f"{request.method} not allowed on {allowed}", {"allow": "POST"})
    limits: GatewayLimits = request.app.state.limits
    refused = _declared_length(request, limits)
    if refused is not None:
        return refused
    budget: BodyBudget = request.app.state.budget
    reader = BodyReader(request.receive, limits.body)
    try:
        buffered = await read_ahead(reader, budget, limits.buffer_bytes)
    except BodyRefused as exc:
        return _error(exc.status, exc.message)
    except ClientDisconnect:
        return _error(400, "the request body ended early")
    try:
        return await _send(request, allowed, reader, buffered)
    finally:
        budget.give(buffered.reserved)


async def _send(request: Request, allowed: str, reader: BodyReader, buffered: Buffered) -> Response:
    """The request sent on to the SuperLink, what was read of its body first; its answer."""
    limits: GatewayLimits = request.app.state.limits
    client: httpx.AsyncClient = request.app.state.upstream
    headers = _request_headers(request)
    if buffered.complete and "content-length" not in request.headers:
        # Read whole from a chunked upload: sent on with its length.
        headers.append((b"content-length", str(reader.size).encode()))
    outgoing = client.build_request(
        "POST", allowed, headers=headers, content=buffered.content(reader)
    )
    try:
        answer = await client.send(outgoing, stream=True)
    except BodyRefused as exc:
        return _error(exc.status, exc.message)
    except ClientDisconnect:
        return _error(400, "the request body ended early")
    except h11.LocalProtocolError as exc:
        # The body did not fit its own framing on the way out (a length it did not keep).
        _LOGGER.warning("fleet gateway: %s could not be forwarded as sent: %s", allowed, exc)
        return _error(400, "the request could not be forwarded as sent")
    except httpx.PoolTimeout:
        _LOGGER.warning(
            "fleet gateway: all %d connections to the SuperLink stayed busy for %gs; "
            "%s refused with 503",
            limits.upstream_connections, limits.upstream_wait_s, allowed,
        )  # fmt: skip
        return _error(503, "the SuperLink is busy; try again later")
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        _LOGGER.warning("fleet gateway: the SuperLink is out of reach: %s", exc)
        return _error(503, "the SuperLink is not available; try again later")
    except (httpx.HTTPError, h11.ProtocolError) as exc:
        _LOGGER.warning("fleet gateway: %s to the SuperLink failed: %s", allowed, exc)
        return _error(502, "the SuperLink did not answer")
    return _Relay(answer, allowed, limits.response_deadline_s)


class _Relay(Response):
    """The SuperLink's answer relayed as it comes (still encoded, as its headers say), every
    header as sent (repeated ones included) in the bytes it came in, within a deadline; the
    upstream connection is given back however the relay ends."""

    def __init__(self, answer: httpx.Response, path: str, deadline_s: float) -> None:
        self.answer = answer
        self.path = path
        self.deadline_s = deadline_s
        self.status_code = answer.status_code
        drop = _RESPONSE_DROP | _named_by_connection(answer.headers.get("connection", ""))
        self.raw_headers = [
            (name, value)
            for name, value in answer.headers.raw
            if name.decode("latin-1").lower() not in drop
        ]
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with asyncio.timeout(self.deadline_s):
                await send(
                    {"type": "http.response.start", "status": self.status_code,
                     "headers": self.raw_headers}
                )  # fmt: skip
                async for chunk in self.answer.aiter_raw():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            # The status line is sent: all that is left is to end the connection early.
            _LOGGER.warning(
                "fleet gateway: the answer to %s was not relayed within %gs",
                self.path, self.deadline_s,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            _LOGGER.warning("fleet gateway: the SuperLink's answer to %s broke off: %s",
                            self.path, exc)  # fmt: skip
        except OSError as exc:
            raise ClientDisconnect() from exc
        finally:
            await self.answer.aclose()


class _EveryMethod:
    """_forward for any method at all, which refuses all but POST in JSON (a Route given the
    function itself would answer the methods it was not given in Starlette's plain text)."""

    def __init__(self) -> None:
        self.app = request_response(_forward)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


async def _refused(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no route for the path, e.g. `OPTIONS *`) in JSON."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    if status == 404:
        return _error(404, "not found: this port serves only Flower's Fleet API")
    return _error(status, "the request was refused" if status < 500 else "internal error")


def create_gateway_app(
    upstream: str,
    *,
    verify: ssl.SSLContext | bool = True,
    limits: GatewayLimits | None = None,
) -> Starlette:
    """The gateway in front of the SuperLink at ``upstream`` (``http(s)://host:port``)."""
    chosen = limits or GatewayLimits()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            base_url=upstream,
            verify=verify,
            # A pull or push of a large object may take a while; connecting must not.
            timeout=httpx.Timeout(120.0, connect=5.0, pool=chosen.upstream_wait_s),
            limits=httpx.Limits(
                max_connections=chosen.upstream_connections, max_keepalive_connections=64
            ),
            follow_redirects=False,
            trust_env=False,  # loopback: never through a proxy the environment names
        ) as client:
            app.state.upstream = client
            app.state.limits = chosen
            app.state.budget = BodyBudget(chosen.buffer_budget_bytes)
            yield

    return Starlette(
        routes=[Route("/{path:path}", _EveryMethod(), methods=None)],
        exception_handlers={HTTPException: _refused, Exception: _refused},
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
        limits: GatewayLimits | None = None,
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
        chosen = limits or GatewayLimits()
        self.limits = chosen
        app = create_gateway_app(
            f"{scheme}://127.0.0.1:{upstream_port}", verify=verify, limits=chosen
        )
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
                limit_concurrency=chosen.max_concurrency,
                # The peer is the client: uvicorn would otherwise take X-Forwarded-* from any
                # client on 127.0.0.1 as the truth about who it is.
                proxy_headers=False,
                # A request head bounded in size and time, refused in JSON; connections
                # from one address capped.
                http=JsonH11Protocol.configured(
                    head_timeout_s=chosen.head_timeout_s,
                    connections_per_peer=chosen.connections_per_address,
                ),
                ws="none",  # an upgrade is a request like any other: a JSON 404 or 405
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
